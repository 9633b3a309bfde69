"""The REST API's request bodies take exactly the JSON types their OpenAPI document gives
(schemathesis found ``"retention_value": true`` accepted as 1)."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import BaseModel, ValidationError

from starter.api_models import BackupCreate, PolicyCreate, PolicyPatch, RestoreRequest


@pytest.mark.parametrize(
    ("model", "body", "field"),
    [
        (PolicyCreate, {"times": ["01:00"], "retention_value": True}, "retention_value"),
        (PolicyCreate, {"times": ["01:00"], "every_days": "2"}, "every_days"),
        (PolicyCreate, {"times": ["01:00"], "enabled": "yes"}, "enabled"),
        (PolicyPatch, {"retention_value": 1.0}, "retention_value"),
        (BackupCreate, {"server_ids": ["srv-1"], "offline": 1}, "offline"),
        (RestoreRequest, {"power_on": "false"}, "power_on"),
    ],
)
def test_a_value_of_another_json_type_is_refused_naming_its_field(
    model: type[BaseModel], body: dict[str, Any], field: str
) -> None:
    with pytest.raises(ValidationError) as err:
        model.model_validate(body)
    assert [e["loc"][0] for e in err.value.errors()] == [field]


def test_values_of_their_own_type_are_taken() -> None:
    body = {"times": ["01:00"], "retention": "count", "retention_value": 3, "every_days": 2}
    policy = PolicyCreate.model_validate(body)
    assert policy.retention_value == 3 and policy.every_days == 2 and policy.enabled is True
    assert RestoreRequest.model_validate({"power_on": False}).power_on is False
