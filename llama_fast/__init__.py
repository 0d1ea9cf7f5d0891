"""The features on top of the reference (model.py, decoding.py, ...): each folder imports the core and is never
imported by it. cpu/: CPU kernels swapped into a loaded model; quant/: quantized formats and GPTQ; speculate/:
speculative and lookahead decoding; serving/: the engine behind serve.py; checkpoint.py and cli.py: what the
commands share."""
