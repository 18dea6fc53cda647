"""The backends of `lorakit quantize`: bitsandbytes 4-bit (`bnb`) and GGUF for llama.cpp
(`gguf`)."""
