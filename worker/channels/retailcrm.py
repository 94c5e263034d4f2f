"""RetailCRM API v5, telephony (seed 004; CHANNELS.md): call events, the call history, and who
is responsible for a caller (smart redirect).

Requests are form-encoded with the JSON in one field and the key in X-API-KEY. An answer counts
only when it says `"success": true` (an HTTP 200 may say false: telephony not enabled for the
account); `duplicateCalls` on an upload means the call is there already, which is success. An
HTML page instead of JSON means the account does not exist. 503 and 429 are RetailCRM's rate
limit: retried after Retry-After when it gives one.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlencode

from pgdispatch.worker.channels.calls import BadEvent, CallEvent
from pgdispatch.worker.channels.delivery import Answer, CheckFailed, Outbound, done, excerpt, retry, stop
from pgdispatch.worker.outcome import Done, Outcome, Retry

# A call event says "no answered"; an uploaded call says "no answer" (two enums in their API).
HANGUP_STATUS = {"answered": "answered", "busy": "busy", "cancel": "cancel", "failed": "failed",
                 "no_answer": "no answered"}
CALL_RESULT = {"answered": "answered", "busy": "busy", "cancel": "no answer", "failed": "failed",
               "no_answer": "no answer"}


async def send_retailcrm(call: CallEvent, io: Outbound) -> Outcome:
    """dial and bridge: a call event (RetailCRM shows the caller's card to the users named);
    hangup: the event, then the call into the history; download: the call again, with its
    recording (RetailCRM keeps the first upload of a call: later ones are duplicateCalls)."""
    try:
        requests = [(method, form) for method, form in _requests(call) if method not in call.delivered]
    except BadEvent as bad:
        return bad.outcome()
    sent_all: list[str] = []
    answers: list[str] = []
    got_through = sorted(call.delivered)
    status = 200
    for method, form in requests:
        sent, answer = await _post(io, call.settings, method, form)
        outcome = verdict(sent, answer)
        if not isinstance(outcome, Done):
            if got_through and isinstance(outcome, Retry) and outcome.detail is not None:
                # A hangup's event got through, its upload did not: the retry sends the upload only.
                return dataclasses.replace(outcome, detail={**outcome.detail, "delivered": got_through})
            return outcome
        got_through.append(method)
        sent_all.append(sent)
        answers.append(answer.text)
        status = answer.status
    return Done(status=status, detail={"request": excerpt("\n".join(sent_all)),
                                       "response": excerpt("\n".join(answers))})


def verdict(sent: str, answer: Answer) -> Outcome:
    reply = answer.json()
    if not isinstance(reply, dict):
        if answer.status >= 500 or answer.status == 429:  # a proxy's error page, say
            return retry(sent, answer, _not_json(answer), answer.retry_after())
        return stop(sent, answer, _not_json(answer))
    if answer.status in (429, 503):
        return retry(sent, answer, f"RetailCRM rate limit ({answer.status}): {_message(reply)}",
                     answer.retry_after())
    if answer.status >= 500:
        return retry(sent, answer, f"RetailCRM answered {answer.status}: {_message(reply)}")
    if 200 <= answer.status < 300 and (reply.get("success") is True or reply.get("duplicateCalls")):
        return done(sent, answer)
    return stop(sent, answer, f"RetailCRM answered {answer.status}: {_message(reply)}")


async def responsible_manager(settings: Mapping[str, Any], io: Outbound, phone: str) -> Mapping[str, Any]:
    """telephony/manager: who is responsible for the customer with this number. Raises
    CheckFailed with RetailCRM's words when it says no."""
    query = urlencode({"phone": phone, "details": 1, "ignoreStatus": 1})
    answer = await io.request("GET", f"{_base(settings)}/telephony/manager?{query}",
                              headers=_headers(settings))
    reply = _reply_or_fail(answer)
    manager = reply.get("manager")
    if not isinstance(manager, dict):
        raise CheckFailed("RetailCRM knows no manager responsible for this number")
    return manager


async def check_retailcrm(settings: Mapping[str, Any], io: Outbound) -> str:
    """`pgdispatch crm config test`: the key's rights, sending nothing. /api/credentials is
    unversioned (both official clients call it without v5; /api/v5/credentials is a 404)."""
    answer = await io.request("GET", f"{_root(settings)}/api/credentials", headers=_headers(settings))
    reply = _reply_or_fail(answer)
    scopes = reply.get("scopes") or reply.get("credentials") or []
    missing = [s for s in ("telephony_write", "telephony_read") if scopes and s not in scopes]
    if missing:
        raise CheckFailed(f"the API key lacks the scopes {', '.join(missing)}")
    return f"RetailCRM answered {answer.status}: the key works" + (
        f" (site {reply['siteAccess']})" if isinstance(reply.get("siteAccess"), str) else "")


def _requests(call: CallEvent) -> list[tuple[str, dict[str, str]]]:
    if call.event == "download":
        url = call.text("record_url")
        if url is None:
            raise BadEvent("a download event needs payload.record_url")
        return [("telephony/calls/upload", _form(call, calls=[{**_call(call), "recordUrl": url}]))]
    requests = [("telephony/call/event", _form(call, event=_event(call)))]
    if call.event == "hangup":
        requests.append(("telephony/calls/upload", _form(call, calls=[_call(call)])))
    return requests


def _event(call: CallEvent) -> dict[str, Any]:
    phone = call.text("phone")
    if phone is None:
        raise BadEvent(f"a {call.event} event needs payload.phone")
    codes = call.extensions()
    event: dict[str, Any] = {"phone": phone, "type": "hangup" if call.event == "hangup" else call.direction(),
                             "codes": codes, "callExternalId": call.call_unique_id}
    users = _user_ids(call.settings, codes)
    if users:
        event["userIds"] = users
    if call.text("line"):
        event["externalPhone"] = call.text("line")
    if call.event == "hangup":
        event["hangupStatus"] = HANGUP_STATUS[call.status()]
    return event


def _call(call: CallEvent) -> dict[str, Any]:
    codes = call.extensions()
    uploaded: dict[str, Any] = {
        "date": call.started_at().strftime("%Y-%m-%d %H:%M:%S"), "type": call.direction(),
        "phone": call.text("phone"), "result": CALL_RESULT[call.status()],
        "duration": call.seconds("duration"), "durationWaiting": call.seconds("waiting"),
        "externalId": call.call_unique_id}
    if codes:
        uploaded["code"] = codes[0]
        users = _user_ids(call.settings, codes[:1])
        if users:
            uploaded["userId"] = users[0]
    if call.text("line"):
        uploaded["externalPhone"] = call.text("line")
    return uploaded


def _user_ids(settings: Mapping[str, Any], codes: list[str]) -> list[int]:
    mappings = settings.get("user_mappings") or {}
    return [int(mappings[c]) for c in codes if c in mappings]


def _form(call: CallEvent, **fields: Any) -> dict[str, str]:
    form = {name: json.dumps(value, ensure_ascii=False, separators=(",", ":"))
            for name, value in fields.items()}
    if call.settings.get("client_id"):
        form["clientId"] = str(call.settings["client_id"])
    return form


async def _post(io: Outbound, settings: Mapping[str, Any], method: str,
                form: Mapping[str, str]) -> tuple[str, Answer]:
    body = urlencode(form)
    url = f"{_base(settings)}/{method}"
    answer = await io.request("POST", url, content=body.encode(), headers={
        **_headers(settings), "Content-Type": "application/x-www-form-urlencoded"})
    return f"POST {url} {body}", answer


def _reply_or_fail(answer: Answer) -> dict[str, Any]:
    reply = answer.json()
    if not isinstance(reply, dict):
        raise CheckFailed(_not_json(answer))
    if not 200 <= answer.status < 300 or reply.get("success") is not True:
        raise CheckFailed(f"RetailCRM answered {answer.status}: {_message(reply)}")
    return reply


def _not_json(answer: Answer) -> str:
    if answer.status < 500 and "<html" in answer.text[:500].lower():
        return (f"RetailCRM answered {answer.status} with an HTML page: "
                "the account does not exist (check api_url)")
    return f"RetailCRM answered {answer.status} with no JSON"


def _message(reply: Mapping[str, Any]) -> str:
    message = str(reply.get("errorMsg") or "no errorMsg")
    errors = reply.get("errors")
    if isinstance(errors, dict) and errors:
        message += " (" + "; ".join(f"{k}: {v}" for k, v in list(errors.items())[:5]) + ")"
    elif isinstance(errors, list) and errors:
        message += " (" + "; ".join(str(e) for e in errors[:5]) + ")"
    return message[:500]


def _root(settings: Mapping[str, Any]) -> str:
    return str(settings["api_url"]).rstrip("/")


def _base(settings: Mapping[str, Any]) -> str:
    return _root(settings) + "/api/v5"


def _headers(settings: Mapping[str, Any]) -> dict[str, str]:
    return {"X-API-KEY": str(settings["api_key"]), "Accept": "application/json"}
