"""Renamed public names: the new spelling works, the old one warns and still works (for one release)."""

from __future__ import annotations

import pytest

from hostkit.channels import Channel, QueuedWorkService
from hostkit.exceptions import ConfigurationError


class TestCancellationTokenRegistration:
    def test_register_returns_a_cancellation_token_registration(self) -> None:
        import hostkit

        token = hostkit.CancellationToken()
        with token.register(lambda: None) as registration:
            assert isinstance(registration, hostkit.CancellationTokenRegistration)
        assert "CancellationTokenRegistration" in hostkit.__all__ and "Registration" not in hostkit.__all__

    def test_old_name_warns_and_is_the_same_class(self) -> None:
        import hostkit

        with pytest.warns(
            DeprecationWarning, match=r"hostkit.Registration is deprecated.*CancellationTokenRegistration"
        ):
            old = hostkit.Registration
        assert old is hostkit.CancellationTokenRegistration
        with pytest.warns(DeprecationWarning, match=r"hostkit.Registration is deprecated"):
            from hostkit import Registration  # noqa: F401


class TestFlaskHostkit:
    @pytest.mark.parametrize(("old", "new"), [("HostKit", "Hostkit"), ("HostKitState", "HostkitState")])
    def test_old_name_warns_and_is_the_same_class(self, old: str, new: str) -> None:
        import hostkit.flask

        with pytest.warns(DeprecationWarning, match=rf"hostkit.flask.{old} is deprecated.*hostkit.flask.{new}"):
            value = getattr(hostkit.flask, old)
        assert value is getattr(hostkit.flask, new)

    def test_unknown_names_are_still_attribute_errors(self) -> None:
        import hostkit.flask

        with pytest.raises(AttributeError, match="has no attribute 'Nothing'"):
            hostkit.flask.Nothing


class TestQueuedWorkServiceVocabulary:
    def test_concurrency_and_placement(self) -> None:
        service: QueuedWorkService[int] = QueuedWorkService(Channel(1), print, concurrency=3, placement="process")
        assert (service.concurrency, service.placement) == (3, "process")

    def test_consumers_warns_and_still_sets_concurrency(self) -> None:
        with pytest.warns(DeprecationWarning, match=r"QueuedWorkService\(consumers=\) is deprecated.*concurrency="):
            service: QueuedWorkService[int] = QueuedWorkService(Channel(1), print, consumers=3)
        assert service.concurrency == 3
        with pytest.warns(DeprecationWarning, match=r"consumers is deprecated: use .concurrency"):
            assert service.consumers == 3

    def test_workers_warns_and_still_sets_placement(self) -> None:
        with pytest.warns(DeprecationWarning, match=r"QueuedWorkService\(workers=\) is deprecated.*placement="):
            service: QueuedWorkService[int] = QueuedWorkService(Channel(1), print, workers="process")
        assert service.placement == "process"
        with pytest.warns(DeprecationWarning, match=r"workers is deprecated: use .placement"):
            assert service.workers == "process"

    def test_old_and_new_together_is_an_error(self) -> None:
        with pytest.raises(ConfigurationError, match=r"consumers= is the deprecated spelling of concurrency="):
            QueuedWorkService(Channel(1), print, consumers=2, concurrency=2)


class TestOneParserForContentionSettings:
    def test_flask_and_django_refuse_a_bad_contention_setting_alike(self) -> None:
        """The same value is refused by both integrations with the same rule, each naming its own setting."""
        from django.conf import settings as django_settings
        from flask import Flask

        from hostkit.flask import Hostkit

        if not django_settings.configured:
            django_settings.configure()
        from django.test import override_settings

        from hostkit.django.apps import host_settings

        rule = r"must be True, False or a dict of ContentionMonitor options, not: 'yes' \(str\)"
        app = Flask("contention")
        app.config["HOSTKIT_CONTENTION"] = "yes"
        with pytest.raises(ConfigurationError, match=rf"^HOSTKIT_CONTENTION {rule}$"):
            Hostkit(app, builder=lambda: None)
        with (
            override_settings(HOSTKIT={"BUILDER": "a:b", "CONTENTION": "yes"}),
            pytest.raises(ConfigurationError, match=rf"^settings.HOSTKIT\['CONTENTION'\] {rule}$"),
        ):
            host_settings()
