"""How an image becomes a score: the published decode and numerics, weights loading, the scorers' runners."""
