"""Reports: the dataclass tree, its JSON Schema and the comparison of two reports."""
