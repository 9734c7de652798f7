"""One byte budget for a whole model: the best compression option per table.

``compress_(model, BudgetConfig(memory_budget_bytes=...), calibration=batches)`` considers, for
every table, keeping it (fp32), fp16 / int8 / int4 rows, AFM at several ranks, product
quantization at several ``M``, AFM then PQ and AFM then int8 / int4; estimates what each costs
in output error on the calibration data (:mod:`~torchrec_compress.budget.cost`); spends the
budget where it buys the most (:mod:`~torchrec_compress.budget.allocate`); and applies the
choices as ordinary per-table overrides of the methods' own configs
(:mod:`~torchrec_compress.budget.driver`).  It composes methods, so it sits above the method
folders and below ``api.py`` (``tests/test_layering.py``).
"""
