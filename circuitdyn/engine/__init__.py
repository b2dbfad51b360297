"""Circuits from a model: settings (`settings`), the computational graph (`graph`), the functional forward (`forward`),
edge attribution (`attribution`), patching and faithfulness, selection rules, memory budgets, circuit files
(`circuits`) and their export formats (`export`)."""
