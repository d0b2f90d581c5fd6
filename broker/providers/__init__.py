"""Identity providers, one module each, built from settings in one place.

A new provider is one new module and one line in ``_IMPLEMENTATIONS``. Modules are
imported on demand so a deployment only loads the providers it configures, and a
provider type whose module is missing fails the start with a clear message.
"""

from __future__ import annotations

import importlib
from typing import Protocol, cast

from broker.errors import ConfigurationError
from broker.http import Http
from broker.providers.base import IdentityProvider
from broker.settings import (
    AmazonProviderSettings,
    FacebookProviderSettings,
    OIDCProviderSettings,
    ProviderSettings,
    Settings,
)
from broker.store import Store

__all__ = ["IdentityProvider", "build_providers"]

# settings type -> (module, class); every class takes (settings=, http=, store=).
_IMPLEMENTATIONS: dict[type[ProviderSettings], tuple[str, str]] = {
    OIDCProviderSettings: ("broker.providers.oidc", "OIDCProvider"),
    AmazonProviderSettings: ("broker.providers.amazon", "AmazonProvider"),
    FacebookProviderSettings: ("broker.providers.facebook", "FacebookProvider"),
}


class _ProviderClass(Protocol):
    def __call__(
        self, *, settings: ProviderSettings, http: Http, store: Store
    ) -> IdentityProvider: ...


def build_providers(settings: Settings, *, http: Http, store: Store) -> dict[str, IdentityProvider]:
    """One provider instance per configured provider, keyed by its configured name."""
    return {
        name: _provider_class(provider)(settings=provider, http=http, store=store)
        for name, provider in settings.providers.items()
    }


def _provider_class(provider: ProviderSettings) -> _ProviderClass:
    try:
        module_name, class_name = _IMPLEMENTATIONS[type(provider)]
    except KeyError:
        raise ConfigurationError(
            f"provider {provider.name!r}: no implementation for {type(provider).__name__}"
        ) from None
    try:
        cls = getattr(importlib.import_module(module_name), class_name)
    except (ImportError, AttributeError) as exc:
        raise ConfigurationError(
            f"provider {provider.name!r}: type {provider.type!r} is not available "
            f"({module_name}.{class_name} cannot be imported)"
        ) from exc
    return cast(_ProviderClass, cls)
