"""Import every model so Base.metadata is complete (Alembic autogenerate, tests)."""

from appliance.audit.models import AuditChainHead, AuditCheckpoint, AuditEvent
from appliance.auth.models import ApiKey
from appliance.documents.models import Document, DocumentVersion
from appliance.enrich.models import DocumentEnrichment, Label
from appliance.ingest.models import Chunk
from appliance.jobs.models import Job
from appliance.keys.models import TenantKey
from appliance.tenants.models import Tenant

__all__ = [
    "ApiKey",
    "AuditChainHead",
    "AuditCheckpoint",
    "AuditEvent",
    "Chunk",
    "Document",
    "DocumentEnrichment",
    "DocumentVersion",
    "Job",
    "Label",
    "Tenant",
    "TenantKey",
]
