"""The scorers: one light module per model declaring how it is built, fed and run, and the registry that finds them."""
