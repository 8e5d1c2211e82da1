"""Moving bytes: persistent channels, bucket packing and unpacking, checksums, and the
one double-buffered bucket pipe (`pipe.py`) every method sends through.

Everything here acts on tensors and processes the plan has already described;
nothing here decides what goes where.
"""
