"""Cross-origin calls from browser pages (CORS): which origins may call the API, the answer to a browser's
preflight and the headers every answer to an allowed origin carries.

Off unless ``llada-serve --allowed-origins`` names origins: without the headers a browser refuses to hand a
page of another origin the answer (what the 415 for non-JSON bodies guards beside it: a page cannot make a
browser send JSON cross-site without a preflight this server then refuses). ``*`` allows any origin; the
API takes no cookies, so no credentials are ever allowed.
"""

from __future__ import annotations

from urllib.parse import urlsplit

METHODS = "GET, POST, OPTIONS"
HEADERS = "authorization, content-type"  # what the openai clients send beyond the CORS-safelisted ones
MAX_AGE_S = 600  # how long a browser may reuse a preflight's answer


def check_origins(origins) -> tuple[str, ...]:
    """``origins`` as given to ``--allowed-origins``: each ``*`` or ``scheme://host[:port]`` (http or https, no
    path), as a browser's ``Origin`` header spells it. Raises ValueError naming a bad one and the form."""
    out = []
    for o in origins:
        if o == "*":
            out.append(o)
            continue
        try:
            u = urlsplit(o)
            port_ok = u.port is None or 0 < u.port < 65536
        except ValueError:
            u, port_ok = None, False
        if (u is None or not port_ok or u.scheme not in ("http", "https") or not u.hostname or u.path
                or u.query or u.fragment or u.username or u.password):
            raise ValueError(f"--allowed-origins: {o!r} is not an origin; give '*' or scheme://host[:port] as a "
                             "browser sends it, e.g. http://localhost:3000 (no path, no trailing slash)")
        out.append(o.lower())
    return tuple(dict.fromkeys(out))


def answer_headers(origin: str | None, allowed: tuple[str, ...]) -> dict[str, str]:
    """The CORS headers of an answer to a request from ``origin`` (its ``Origin`` header): none when the
    request has no origin or the origin is not allowed."""
    if not origin or not allowed:
        return {}
    if "*" in allowed:
        return {"Access-Control-Allow-Origin": "*"}
    if origin.lower() in allowed:
        return {"Access-Control-Allow-Origin": origin, "Vary": "Origin"}
    return {}


def preflight_headers(origin: str | None, requested_headers: str | None, allowed: tuple[str, ...]) -> dict | None:
    """The headers of the 204 answering a browser's preflight (``OPTIONS`` with
    ``Access-Control-Request-Method``) from ``origin``, or None when that origin may not call the API."""
    base = answer_headers(origin, allowed)
    if not base:
        return None
    return {**base, "Access-Control-Allow-Methods": METHODS,
            "Access-Control-Allow-Headers": requested_headers or HEADERS, "Access-Control-Max-Age": str(MAX_AGE_S)}
