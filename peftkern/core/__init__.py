"""What every op family shares, one definition each: backend selection (backend.py), the registry of
implementations and the measured choice between them (dispatch.py), argument checks (checks.py), the
numeric rules every backend follows (rules.py) and the op-declaration helper (opdef.py)."""
