"""One record of a stage that raised (fsdpqdiag.probes.raised), whichever probe writes it."""

from fsdpqdiag.probes.raised import MAX_EXCEPTION_CHARS, RaisedStage


class Owner:
    def fail(self):
        raise ValueError("first line\nsecond line")


def _caught(action):
    try:
        action()
    except Exception as exc:  # noqa: BLE001
        return exc
    raise AssertionError("did not raise")


def test_record_names_exception_frame_and_module():
    owner = Owner()
    record = RaisedStage.of(_caught(owner.fail), "forward", {id(owner): "layers.0"})
    assert record.exception == "ValueError: first line"
    assert record.frame.endswith(" in fail") and record.fsdp_frame is None
    assert (record.module, record.module_type) == ("layers.0", "Owner")
    evidence = record.to_dict()
    assert {"stage", "exception", "frame", "fsdp_frame", "module", "module_type"} <= set(evidence)
    # The names older probes and reports use for the same facts stay readable.
    assert evidence["status"] == "raised"
    assert (evidence["error"], evidence["where"]) == (record.exception, record.frame)


def test_record_without_message_or_modules():
    def fail():
        raise RuntimeError("x" * 2000)

    record = RaisedStage.of(_caught(fail))
    assert record.stage is None and record.module is None
    assert len(record.exception) == MAX_EXCEPTION_CHARS
    assert RaisedStage.of(_caught(lambda: (_ for _ in ()).throw(KeyError()))).exception == "KeyError"
