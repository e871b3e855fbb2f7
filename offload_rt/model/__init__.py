"""The resident trunk of a Mixtral-family model, written for this runtime (plain torch)."""
