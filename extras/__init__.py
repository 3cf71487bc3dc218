"""Everything a reader of the paper's sections 2-3 does not need; each file says in its first line what it serves."""
