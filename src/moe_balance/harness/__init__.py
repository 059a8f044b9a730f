"""The harness: everything that trains, evaluates and reports, built on the library above it.

The library (``moe_balance``) is the MoE layer and its balancing; it imports nothing from here.
The harness reproduces the paper's experiment with it: a DeepSeekMoE-layout model
(``model``), corpora and tokenizers (``data``, ``sampling``), named methods and sweeps
(``methods``), the training loop with evaluation and floors (``train`` and its parts), run
directories and checkpoints, reports and plots (``report``), the benchmark (``bench``),
fine-tuning of transformers checkpoints (``finetune``) and the command line (``cli``).
"""
