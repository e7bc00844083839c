"""AGIASI Soul Fusion: QLoRA + SO(8) soul training, fusion, GGUF and Ollama stages.

Each stage is one module with one entry function (train.train, fuse.fuse,
gguf.convert / gguf.quantize, ollama.write_modelfile / ollama.register);
`python -m pipeline <command>` (cli.py) is how the Makefile calls them.
Importing this package is cheap: heavy libraries load inside the stages.
"""
