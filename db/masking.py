"""The masking of secrets, in Python: what dispatch.mask_secrets and dispatch.mask_text (sql/) do
to documents and free text, for what is masked before it is stored (errors, a step's payload
before it is cut to an excerpt, a request's excerpt). tests/test_secrets.py checks that both
give the same answers.

Masked: JWTs wherever they are, bearer/basic/token credentials, the values of secret-looking
JSON members and query or form parameters (token, key, secret, password, signature, ...),
URL userinfo; in documents, whatever a secret-looking key holds (a string, a list, an object).
"""

from __future__ import annotations

import re
from typing import Any

MASK = "***"

_SECRET_WORDS = (r"secret|token|password|passwd|authorization|api[_-]?key|private[_-]?key|signature"
                 r"|credential|cookie")
SECRET_KEY = re.compile(rf"(?i)({_SECRET_WORDS})")
_JWT = re.compile(r"eyJ[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]*")
_WHOLE_JWT = re.compile(rf"^{_JWT.pattern}$")
_SCHEME = re.compile(r"(?i)^[a-z][a-z0-9+.-]*://")
_URL_USERINFO = re.compile(r"(?i)^([a-z][a-z0-9+.-]*://)[^/@]*@")
_URL_SECRET_QUERY = re.compile(r"(?i)([?&][^=&#]*(token|key|secret|password|passwd|sig|auth)[^=&#]*=)[^&#]*")
_TEXT_USERINFO = re.compile(r"(?i)\b([a-z][a-z0-9+.-]*://)[^/@\s\"'<>]*@")
_TEXT_CREDENTIAL = re.compile(r"(?i)\b(bearer|basic|token)(\s+)[A-Za-z0-9._~+/=-]+")
_TEXT_MEMBER = re.compile(rf'(?i)("[^"]*({_SECRET_WORDS})[^"]*"\s*:\s*)("(\\.|[^"\\])*"|[^,}}\s]+)')
_TEXT_PARAMETER = re.compile(r"(?i)(\b[A-Za-z0-9_.-]*(secret|token|password|passwd|api[_-]?key|signature"
                             r"|credential|auth)[A-Za-z0-9_.-]*=)[^&\s\"'<>]+")


def mask_text(text: str) -> str:
    """Secrets in free text (an error, a response excerpt), as dispatch.mask_text."""
    text = _JWT.sub(MASK, text)
    text = _TEXT_USERINFO.sub(r"\1***@", text)
    text = _TEXT_CREDENTIAL.sub(r"\1\2***", text)
    text = _TEXT_MEMBER.sub(r'\1"***"', text)
    return _TEXT_PARAMETER.sub(r"\1***", text)


def mask_url(url: str) -> str:
    """A URL with its userinfo and secret-looking query values masked (its path kept)."""
    return _URL_SECRET_QUERY.sub(r"\1***", _URL_USERINFO.sub(r"\1***@", url))


def mask_document(doc: Any) -> Any:
    """A JSON document with its secrets masked, as dispatch.mask_secrets: whatever a
    secret-looking key holds, a JWT anywhere, a URL's userinfo and secret query values."""
    if isinstance(doc, dict):
        return {key: MASK if SECRET_KEY.search(str(key)) else mask_document(value)
                for key, value in doc.items()}
    if isinstance(doc, list):
        return [mask_document(item) for item in doc]
    if isinstance(doc, str):
        if _WHOLE_JWT.match(doc):
            return MASK
        if _SCHEME.match(doc):
            return mask_url(doc)
    return doc
