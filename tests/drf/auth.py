"""An auth backend for tests: ``Authorization: Bearer <name>`` is user <name>; no header is anonymous."""

from __future__ import annotations

from typing import Any

from django.contrib.auth.models import AnonymousUser
from rest_framework_mcp.auth.backends.allow_any_backend import AllowAnyBackend
from rest_framework_mcp.auth.types.token_info import TokenInfo


class NamedUser:
    is_authenticated = True
    is_anonymous = False

    def __init__(self, name: str) -> None:
        self.pk = name
        self.username = name


class BearerNameBackend(AllowAnyBackend):
    def authenticate(self, request: Any) -> TokenInfo | None:
        header = request.headers.get("Authorization", "")
        user: Any = NamedUser(header[7:]) if header.startswith("Bearer ") else AnonymousUser()
        return TokenInfo(user=user, scopes=(), audience=None, raw=None)
