"""`leader demo`: the whole system on the built-in phantom, with demo teachers in the real formats.

- `teachers`: the disease teacher (Keras -> CXR Foundation v2 SavedModel) and the anatomy teacher
  (timm -> Adam-v2 checkpoint), trained on the phantom's train split.
- `pipeline`: the ordered, resumable steps and the paper's claims.
- `commands`: the `leader demo` typer command.
"""
