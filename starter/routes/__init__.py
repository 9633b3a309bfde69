"""The REST API's routes, one router per resource, each calling the façade
(``starter.facade.Facade``) that ``create_app`` puts on the application's state."""

from starter.routes.audit import router as audit
from starter.routes.backups import router as backups
from starter.routes.policies import router as policies
from starter.routes.quota import router as quota
from starter.routes.servers import router as servers
from starter.routes.tasks import router as tasks

ROUTERS = [servers, backups, tasks, policies, quota, audit]

__all__ = ["ROUTERS"]
