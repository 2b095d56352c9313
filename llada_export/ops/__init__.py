"""Custom ops the exported programs call (registered on import; this package imports nothing of llada_export)."""
