"""Expert weight formats: how one expert is stored in its record (one contiguous buffer, so a
move between tiers stays one read or one copy) and how it is computed.

``formats.py`` names them (float, int8, int4) and picks the kernels; ``record.py`` lays named
parts out in a record; ``int8.py`` / ``int4.py`` quantize. The engine moves records without
knowing their format. Running them: ``folder.py`` reads a quantized folder's
``quantization_config``, ``select.py`` picks a run's format (the folder's, or ``--experts``),
``reader.py`` quantizes float experts as they are read; ``trunk_int8.py`` reads (and
quantizes) a folder's stored int8 trunk. fp8 checkpoints: ``fp8_scheme.py`` reads their
config, ``fp8_tensors.py`` their weights and scales, ``fp8.py`` is their experts' format,
``fp8_reader.py`` fills its records, ``fp8_memory.py`` budgets it, ``fp8_writer.py`` writes one.
Writing (``offload-rt quantize``): ``quantize.py`` from a ``source.py``, what each tensor
becomes in ``outputs.py``, files by ``writer.py`` / ``shards.py`` / ``output_dir.py``.
"""
