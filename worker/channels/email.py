"""E-mail over SMTP (aiosmtplib): STARTTLS, implicit TLS or plain, as the credential says.

The server's name is resolved once, each address checked by the destination policy (IPv4 and
IPv6 alike), and the connection is made to an address that passed; TLS still verifies the
server's name. Resolving again to connect (as aiosmtplib would) could reach another address
than the one checked (DNS rebinding)."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Mapping
from email.message import EmailMessage
from typing import Any

import aiosmtplib

from pgdispatch.worker.channels.delivery import ChannelIO, CheckFailed, Delivery
from pgdispatch.worker.outbound.destinations import Destinations, ForbiddenDestination
from pgdispatch.worker.outcome import Discard, Done, Outcome, Retry

TIMEOUT = 30.0


def message(delivery: Delivery) -> EmailMessage:
    settings = delivery.settings
    mail = EmailMessage()
    mail["From"] = str(settings["from"])
    mail["To"] = ", ".join(str(to) for to in settings["to"])
    mail["Subject"] = str(settings.get("subject") or f"New lead #{delivery.lead_id}")
    mail["Message-ID"] = f"<lead-delivery-{delivery.delivery_id}@pgdispatch>"  # the same on a retry
    lines = [f"New lead #{delivery.lead_id}", ""]
    lines += [f"{key}: {value}" for key, value in delivery.lead_lines()]
    mail.set_content("\n".join(lines))
    return mail


async def connect(destinations: Destinations, host: str, port: int) -> socket.socket:
    """A TCP connection to an address of `host` the policy allows (the first that answers)."""
    loop = asyncio.get_running_loop()
    failure: OSError = OSError(f"{host} has no address")
    for address in await destinations.addresses(host, port):
        sock = socket.socket(address["family"], socket.SOCK_STREAM)
        sock.setblocking(False)
        try:
            async with asyncio.timeout(TIMEOUT):
                await loop.sock_connect(sock, (address["host"], address["port"]))
            return sock
        except (OSError, TimeoutError) as exc:
            sock.close()
            failure = exc if isinstance(exc, OSError) else OSError(f"{address['host']}: no answer")
        except BaseException:
            sock.close()
            raise
    raise failure


async def send_email(delivery: Delivery, io: ChannelIO) -> Outcome:
    settings = delivery.settings
    host, port, security = str(settings["host"]), int(settings["port"]), settings["security"]
    mail = message(delivery)
    sent = f"SMTP {host}:{port} ({security}) to {mail['To']}: {mail['Subject']}"
    detail = {"request": sent}
    try:  # the same policy as HTTP: no private, loopback or link-local servers unless allowed
        sock = await connect(io.destinations, host, port)
    except ForbiddenDestination as exc:
        return Discard("discarded", error=f"{host}: {exc}", detail=detail)
    except OSError as exc:
        return Retry(error=f"SMTP {host}:{port}: {type(exc).__name__}: {exc}", detail=detail)
    try:
        refused, reply = await aiosmtplib.send(
            mail, hostname=host, sock=sock, username=settings.get("username"),
            password=settings.get("password"), use_tls=security == "ssl", start_tls=security == "starttls",
            timeout=TIMEOUT)
    except aiosmtplib.SMTPAuthenticationError as exc:
        return Discard("discarded", error=f"SMTP authentication failed ({exc.code}): check the credential",
                       detail=detail)
    except aiosmtplib.SMTPRecipientsRefused as exc:
        return Discard("discarded", error=f"SMTP refused every recipient: {_refusals(exc.recipients)}",
                       detail=detail)
    except aiosmtplib.SMTPResponseException as exc:
        why = f"SMTP {exc.code}: {exc.message}"
        if 400 <= exc.code < 500:
            return Retry(error=why, detail=detail)
        return Discard("discarded", error=why, detail=detail)
    except (TimeoutError, aiosmtplib.SMTPException, OSError) as exc:
        # Connect errors, timeouts, a server that hung up, a STARTTLS the server does not offer.
        return Retry(error=f"SMTP {host}:{port}: {type(exc).__name__}: {exc}", detail=detail)
    finally:
        sock.close()
    answer = {"request": sent, "response": reply}
    if refused:
        answer["response"] += f"; refused: {', '.join(f'{to} ({r.code})' for to, r in refused.items())}"
    return Done(detail=answer)


def _refusals(recipients: list[aiosmtplib.SMTPRecipientRefused]) -> str:
    return ", ".join(f"{r.recipient} ({r.code} {r.message})" for r in recipients)


async def check_email(settings: Mapping[str, Any], io: ChannelIO) -> str:
    """Connect, say EHLO, secure the session as configured and log in; nothing is sent."""
    host, port, security = str(settings["host"]), int(settings["port"]), settings["security"]
    try:
        sock = await connect(io.destinations, host, port)
    except OSError as exc:
        raise CheckFailed(f"SMTP {host}:{port} ({security}): {type(exc).__name__}: {exc}") from None
    client = aiosmtplib.SMTP(hostname=host, sock=sock, use_tls=security == "ssl",
                             start_tls=security == "starttls", timeout=TIMEOUT)
    try:
        await client.connect()
        if settings.get("username"):
            await client.login(str(settings["username"]), str(settings.get("password") or ""))
        await client.quit()
    except (TimeoutError, aiosmtplib.SMTPException, OSError) as exc:
        raise CheckFailed(f"SMTP {host}:{port} ({security}): {type(exc).__name__}: {exc}") from None
    finally:
        sock.close()
    login = " and the login" if settings.get("username") else ""
    return f"SMTP {host}:{port} accepts a {security} session{login}"
