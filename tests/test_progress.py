"""The one progress protocol: `Steps` counts forward, `print_progress` renders it for scripts."""

from unet_edge.progress import Steps, print_progress


def test_print_progress_shows_whole_steps_as_counts_and_a_step_in_parts_as_a_percentage(capsys):
    show = print_progress("job", min_interval_s=0)
    show(1, 4, "a")
    show(1.4, 4, "b")
    show(3, None, "c")
    lines = capsys.readouterr().err.splitlines()
    assert [line.split("] ", 1)[1] for line in lines] == ["job 1/4: a", "job 35%: b", "job 3: c"]


def test_a_part_fills_its_span_and_the_count_never_moves_back():
    seen = []
    steps = Steps(lambda done, total, label: seen.append((done, total, label)), total=4)
    steps.advance(1, "first")
    part = steps.part(2, "sub: ")
    part(1, 2, "half")
    part(0, 2, "restarted")  # a sub-loop that starts again does not move the count back
    steps.advance(2)
    assert seen == [(1, 4, "first"), (2, 4, "sub: half"), (2, 4, "sub: restarted"), (3, 4, "sub: restarted")]
