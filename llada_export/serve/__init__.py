"""Serving: ``llada-serve`` on Ray Serve (``app``, ``server``), its HTTP API (``api``) and a client
(``client``, standard library only). Only ``app`` and ``server`` import Ray."""
