"""The compiled extension (csrc/), shared by the "cpp" and "cuda" backends.

``build.py`` compiles and caches it; ``ops.py`` loads it and wraps its custom ops
(``torch.ops.albert_kernels.*``) as differentiable, torch.compile-able functions. Importing this
package builds nothing: import ``ops`` (or call ``build.build()``) for that.
"""
