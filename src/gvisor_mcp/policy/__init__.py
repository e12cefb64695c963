"""What an agent may ask for: the operator's YAML policy, loaded strictly, and resolve().

    policy = load("policy.yaml")            # or load_default(); raises PolicyError
    resolved = resolve(policy, ExecRequest(command="make test"), "default",
                       workspace_root=state_dir / "workspaces", session_id=sid)
    resolved.options   # ContainerOptions for sandbox.Manager.run()
    resolved.receipt   # LimitsReceipt: requested / granted / rule per field

See docs/policy.md for every key of the file.
"""

from .errors import PolicyDenied, PolicyError, Problem, UnknownTenant
from .loader import DEFAULT_POLICY_NAME, Policy, default_policy_text, load, load_default, loads
from .model import (
    BUILTIN_IMAGE,
    DEFAULT_TENANT,
    Ceilings,
    Defaults,
    Env,
    Files,
    Images,
    Network,
    Output,
    PolicyFile,
    Project,
    Quotas,
    Settings,
    TenantSection,
    TenantSettings,
    Workspace,
)
from .receipt import LimitsReceipt, ReceiptEntry
from .request import ExecRequest
from .resolve import (
    Resolved,
    WorkspacePlan,
    path_component,
    plan_workspace,
    project_mounts,
    resolve,
    workspace_host_path,
)

__all__ = [
    "BUILTIN_IMAGE",
    "DEFAULT_POLICY_NAME",
    "DEFAULT_TENANT",
    "Ceilings",
    "Defaults",
    "Env",
    "ExecRequest",
    "Files",
    "Images",
    "LimitsReceipt",
    "Network",
    "Output",
    "Policy",
    "PolicyDenied",
    "PolicyError",
    "PolicyFile",
    "Problem",
    "Project",
    "Quotas",
    "ReceiptEntry",
    "Resolved",
    "Settings",
    "TenantSection",
    "TenantSettings",
    "UnknownTenant",
    "Workspace",
    "WorkspacePlan",
    "default_policy_text",
    "load",
    "load_default",
    "loads",
    "path_component",
    "plan_workspace",
    "project_mounts",
    "resolve",
    "workspace_host_path",
]
