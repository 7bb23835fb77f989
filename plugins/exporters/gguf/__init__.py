"""The ``gguf`` exporter package: GGUF files for llama.cpp and Ollama, converted offline and verified.

Which file does what:

- :mod:`.exporter`: the :class:`~.exporter.GgufExporter` plugin (options, preflight, export);
- :mod:`.quants`: the quant types and which tool makes each;
- :mod:`.convert`: HF Llama folder -> GGUF in pure Python (f16, bf16, q8_0);
- :mod:`.llama`: llama.cpp's quantizer (K-quants) and quieting its native output;
- :mod:`.verify`: loading a GGUF in llama.cpp and comparing its greedy tokens with the HF model;
- :mod:`.worker`: the torch-free child process that runs llama.cpp work;
- :mod:`.header`: reading a GGUF header; :mod:`.modelfile`: the Ollama Modelfile.
"""

from .exporter import GgufExporter, GgufOptions, register_exporters

__all__ = ["GgufExporter", "GgufOptions", "register_exporters"]
