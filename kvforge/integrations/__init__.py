"""Adapters between kvforge and other libraries (e.g. Hugging Face transformers).

This layer sits above storage, kernels and the engine and below the tools;
each adapter lives in its own module and imports its library lazily.
"""
