"""`lorakit generate`: answers with the adapter's template, and a chat that streams replies."""

from typer.testing import CliRunner

from lorakit.cli import app
from tests.conftest import FACTS


def run(*args: str, input: str | None = None):
    result = CliRunner().invoke(app, [str(a) for a in args], input=input, env={"COLUMNS": "200"})
    return result.exit_code, result.stdout, result.stderr


def test_generate_answers_a_prompt_with_the_adapters_template(memorized):
    result, _ = memorized
    question, answer = FACTS[1]
    code, out, err = run("generate", result.run_dir, "--prompt", question, "--max-new-tokens", "16")
    assert code == 0, err
    assert out == answer + "\n"


def test_generate_chat_streams_replies_to_piped_stdin(memorized):
    result, _ = memorized
    (q1, a1), (q2, a2) = FACTS[0], FACTS[4]
    code, out, err = run(
        "generate",
        result.run_dir,
        "--chat",
        "--max-new-tokens",
        "16",
        input=f"{q1}\n/reset\n\n{q2}\n/exit\n{q1}\n",
    )
    assert code == 0, err
    assert out.splitlines() == [a1, a2]


def test_chat_without_a_chat_template_answers_each_message_alone(tiny_model):
    code, out, err = run(
        "generate", tiny_model("gpt2"), "--chat", "--max-new-tokens", "4", input="hello\nagain\n"
    )
    assert code == 0, err
    assert "no chat template; each message is answered on its own" in err
    assert out.count("\n") >= 2
