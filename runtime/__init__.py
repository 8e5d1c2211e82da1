"""The transfer runtime: plans copies from the generated shard tables and moves them.

Imports generated converter modules, never the compiler.
"""
