"""Make Triton's CPU interpreter (TRITON_INTERPRET=1) run the project's kernels.

With numpy 2, `range(tensor, ...)` inside an interpreted kernel fails: int() of the interpreter's
one-element arrays. `patch_interpreter_index` gives its tensors an __index__ that takes the single
element. The interpreter leaves libdevice's functions as stubs that return None:
`patch_interpreter_libdevice` runs `libdevice.exp` as `tl.exp` (numpy's exp). Kernel modules call
`patch_if_interpreting()` at import.
"""

from __future__ import annotations

import os


def patch_interpreter_index() -> None:
    from triton.runtime import interpreter

    if getattr(interpreter, "_kcache_index_patched", False):
        return
    original = interpreter._patch_lang_tensor

    def patched(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))
    interpreter._patch_lang_tensor = patched
    interpreter._kcache_index_patched = True


def patch_interpreter_libdevice() -> None:
    import triton.language as tl
    from triton.language.extra import libdevice

    libdevice.exp = lambda x: tl.exp(x)  # tl.exp looked up at the call: the interpreter's, while a kernel runs


def patch_if_interpreting() -> None:
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        patch_interpreter_index()
        patch_interpreter_libdevice()
