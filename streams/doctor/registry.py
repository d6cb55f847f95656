"""The doctor's registry checks (issue #23): every candidate the registry holds, as a replay process
would load it. A record whose file is gone, whose SHA-256 no longer matches, or that does not load is
one line naming it and the fix, before a replay process refuses it at run time."""

from __future__ import annotations

from streams.config import ConfigError, Settings
from streams.doctor.checks import FAIL, INFO, OK, Check, model_failure


async def registry_checks(settings: Settings) -> list[Check]:
    from streams.registry import store as registry
    from streams.replay.core import Candidate

    try:
        specs, _ = await registry.read_all(settings)
    except registry.RegistryError:  # no topic yet: as the other topics, made (and seeded) by the first worker
        return [Check("registry topic", OK, f"{settings.kafka.candidates_topic}: will be created at worker start and "
                      "seeded from [[candidates]]")]  # fmt: skip
    except Exception as exc:  # noqa: BLE001 - the Kafka checks already say why the broker is away
        return [Check("registry", INFO, f"not read ({type(exc).__name__})", "see the Kafka checks above")]
    checks = []
    for rec in sorted(specs.values(), key=lambda r: r.key):
        what = f"registry {rec.key} v{rec.version}"
        if rec.state == "retired":
            checks.append(Check(what, OK, "retired: not replayed"))
            continue
        fix = (f"restore the file, or register the new one: shadowlens candidates add --model {rec.model} "
               f"--candidate {rec.candidate} --path <file> (a new version)")  # fmt: skip
        try:
            path = registry.local_path(rec.path)
            digest = registry.sha256_file(path)
        except (OSError, registry.RegistryError) as exc:
            checks.append(Check(what, FAIL, f"{rec.path}: {exc}", fix))
            continue
        if digest != rec.sha256:
            checks.append(Check(what, FAIL, f"{path}: SHA-256 {digest[:12]}…, the registry pins {rec.sha256[:12]}…",
                                fix))  # fmt: skip
            continue
        try:
            Candidate.load(registry.config_from_record(rec), settings.replay.providers)
        except ConfigError as exc:
            checks.append(Check(what, FAIL, str(exc), fix))
            continue
        except Exception as exc:  # noqa: BLE001 - what a replay process would refuse it for
            cause, more = model_failure(registry.config_from_record(rec, need_file=False), exc)
            checks.append(Check(what, FAIL, cause, more or fix))
            continue
        checks.append(Check(what, OK, f"{path.name}: SHA-256 matches, loads ({rec.kind}, {rec.runtime})"))
    return checks
