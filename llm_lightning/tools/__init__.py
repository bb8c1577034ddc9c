"""The work behind each entry point (``train.py``, ``generate.py``, ...), one module per tool, each a
function of the composed config; the scripts at the repository root are thin Hydra shims over them."""
