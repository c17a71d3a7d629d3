"""Pretrained perception networks (ResNet-50 today; VGG19, face recognition, LPIPS, ... to come).

Pure math like the model packages: modules and functions over arrays, importing only jax, flax, optax
and numpy. Reading weight files is ``launch/convert.py``'s job; these modules convert in-memory state
dicts (``from_torch`` / ``to_torch``).
"""
