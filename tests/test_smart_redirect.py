"""Smart redirect (seed 004) against a local fake RetailCRM: the extension of the manager
responsible for a caller, or "no redirect" with the reason, always within the 2 s budget."""

from __future__ import annotations

import json
import time
from typing import Any

import pytest

from pgdispatch.worker.config import WorkerConfig
from pgdispatch.worker.smart_redirect import BadRequest, smart_redirect_service
from tests.fake_retailcrm import API_KEY, fake_retailcrm
from tests.helpers import execute, scalar, wait_until


def enterprise(db_url: str, number: str, **retailcrm: Any) -> None:
    execute(db_url, "INSERT INTO dispatch.enterprises (number, name, integrations_config) VALUES (%s, %s, %s)",
            (number, number, json.dumps({"retailcrm": {"enabled": True, "api_key": API_KEY, **retailcrm}})))


async def test_the_responsible_managers_extension_or_no_redirect_with_the_reason(db_url: str) -> None:
    async with fake_retailcrm() as fake, smart_redirect_service(WorkerConfig(database_url=db_url)) as redirect:
        enterprise(db_url, "0367", api_url=fake.api_url("ok"), user_mappings={"151": 16})
        for number, account in (("html", "html"), ("denied", "ok"), ("slow", "slow")):
            enterprise(db_url, number, api_url=fake.api_url(account))
        execute(db_url, "UPDATE dispatch.enterprises SET integrations_config = jsonb_set(integrations_config, "
                        "'{retailcrm,api_key}', '\"wrong\"') WHERE number = 'denied'")
        enterprise(db_url, "off", api_url=fake.api_url("ok"), enabled=False)
        enterprise(db_url, "refused", api_url="http://127.0.0.1:9")

        async def ask(number: str, phone: str = "+79990001122") -> dict[str, Any]:
            answer = await redirect.answer(number, phone)
            assert answer.pop("took_ms") < 2500
            return answer

        # user_mappings first (extension -> CRM user id), else the manager's code in RetailCRM.
        assert await ask("0367") == {"redirect": True, "extension": "151", "manager_id": 16, "manager": "Ann Lee"}
        assert await ask("0367", "+79990003344") == {"redirect": True, "extension": "512", "manager_id": 77,
                                                     "manager": "Bob"}
        assert await ask("0367", "+79990005566") == {
            "redirect": False, "reason": "manager 78 has no extension in user_mappings and no code in RetailCRM"}
        assert await ask("0367", "+70000000000") == {"redirect": False, "reason": "RetailCRM answered 404: Not found"}
        assert await ask("html") == {"redirect": False, "reason": "RetailCRM answered 404 with an HTML page: "
                                                                  "the account does not exist (check api_url)"}
        assert await ask("denied") == {"redirect": False, "reason": 'RetailCRM answered 403: Wrong "apiKey" value.'}
        assert await ask("off") == {"redirect": False, "reason": "retailcrm is not enabled for enterprise off"}
        assert await ask("nope") == {"redirect": False, "reason": "no enterprise nope"}
        assert await ask("refused") == {"redirect": False, "reason": "127.0.0.1:9: ConnectError: connection refused"}
        began = time.perf_counter()
        assert await ask("slow") == {"redirect": False, "reason": "no answer from the CRM within 2s"}
        assert 1.9 < time.perf_counter() - began < 2.5
        for number, phone, message in (("", "+79990001122", "enterprise is required"),
                                       ("0367", None, "phone must be 3-20 digits"),
                                       ("0367", "12; DROP", "phone must be 3-20 digits")):
            with pytest.raises(BadRequest, match=message):
                await redirect.answer(number, phone)
        # The hot path reads the cache: asked again, no enterprise is loaded again.
        loads = redirect.stats()["config_cache"]["loads"]
        assert (await ask("0367"))["extension"] == "151"
        assert redirect.stats()["config_cache"]["loads"] == loads
        assert redirect.stats()["over_budget"] == 1 and redirect.stats()["redirected"] == 3
        # A change is seen at once (NOTIFY): the mapping moves to another extension.
        execute(db_url, "UPDATE dispatch.enterprises SET integrations_config = jsonb_set(integrations_config, "
                        "'{retailcrm,user_mappings}', '{\"160\": 16}') WHERE number = '0367'")
        await wait_until(lambda: not redirect.configs.cached("0367")[0])
        assert (await ask("0367"))["extension"] == "160"
        assert API_KEY not in json.dumps(redirect.stats())
        assert scalar(db_url, "SELECT count(*) FROM dispatch.enterprises") == 6
