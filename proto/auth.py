"""The bearer token's environment variable, named once for every side.

``clsp serve`` reads the token from it, and ``clsp train`` and ``clsp generate``
send it, so one secret configures a whole pool. It has its own, documented name
(not ``CLSP_TOKEN``) so that it never has to appear on a command line, where
``ps`` would show it (docs/design.md §8).
"""

from __future__ import annotations

TOKEN_ENV = "CLSP_API_TOKEN"
