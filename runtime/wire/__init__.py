"""Moving bytes: persistent channels, bucket packing and unpacking, checksums.

Everything here acts on tensors and processes the plan has already described;
nothing here decides what goes where.
"""
