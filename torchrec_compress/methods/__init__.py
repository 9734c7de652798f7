"""The compression methods, one package each (config, handler, modules, sharders, drivers).

Importing this package registers every built-in method in :mod:`torchrec_compress.registry`.
"""
