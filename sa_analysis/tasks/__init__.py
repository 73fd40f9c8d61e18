"""lm-evaluation-harness tasks that ship with sa-analysis and run offline (sa_tiny_mc: YAML + JSONL beside this file)."""
