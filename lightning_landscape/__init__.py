"""lightning-landscape."""
