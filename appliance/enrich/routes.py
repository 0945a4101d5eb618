"""The tenant's labels for `classify` jobs: `GET /labels` (viewer), `PUT /labels` (tenant admin)."""

from __future__ import annotations

from collections.abc import Sequence

from fastapi import APIRouter

from appliance.audit import service as audit
from appliance.auth.deps import SessionDep, TenantAdmin, Viewer
from appliance.enrich import service
from appliance.enrich.models import Label
from appliance.enrich.schemas import LabelList, LabelOut, LabelsIn
from appliance.errors import Forbidden, Unauthorized, problem_responses

router = APIRouter(tags=["labels"])


def _out(labels: Sequence[Label]) -> LabelList:
    return LabelList(labels=[LabelOut(name=lb.name, description=lb.description) for lb in labels])


@router.get("/labels", response_model=LabelList, responses=problem_responses(Unauthorized, Forbidden))
async def get_labels(principal: Viewer, session: SessionDep) -> LabelList:
    """The tenant's labels, in their order (empty until a tenant admin sets them)."""
    labels = await service.list_labels(session)
    audit.record(session, "labels.read", resource_type="labels", details={"returned": len(labels)})
    return _out(labels)


@router.put(
    "/labels",
    response_model=LabelList,
    responses=problem_responses(Unauthorized, Forbidden, service.LabelsInvalid),
)
async def put_labels(body: LabelsIn, principal: TenantAdmin, session: SessionDep) -> LabelList:
    """Replace all the tenant's labels (tenant admin).

    1-200 labels, names unique whatever their case. Documents already classified keep their labels
    until they are classified again (upload the same bytes with `classify=true`). Errors (422, by
    `code`): `labels_empty`, `labels_too_many`, `label_name_invalid`, `label_name_duplicate`,
    `label_description_too_long` (these carry the label's `index`), and `validation_error` for a body
    that is not `{"labels": [{"name": ..., "description": ...}]}`."""
    assert principal.tenant_id is not None
    return _out(await service.replace_labels(session, principal.tenant_id, body.labels))
