"""Build of lora2gguf's optional compiled merge kernel (everything else is in pyproject.toml).

The extension is optional: where no C compiler is found the install goes on and the merge runs
in numpy (the same bytes, about twice as slow; ``lora2gguf doctor`` says so)."""

from setuptools import Extension, setup

setup(ext_modules=[Extension("lora2gguf._kernels", sources=["src/lora2gguf/_kernels.c"], optional=True,
                             extra_compile_args=["-O3", "-fno-strict-aliasing"])])
