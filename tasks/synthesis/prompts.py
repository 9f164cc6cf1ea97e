"""The synthesis prompts (paper appendix A.1): the task kinds, the instruction each pair is trained
with, the configuration and query-generation templates with their examples, and the bitext, STS and
classification prompts. Any change here must bump PROMPT_VERSION."""

from __future__ import annotations

import json
from typing import Sequence

from tasks.synthesis.generators import Messages

PROMPT_VERSION = "a1-v4"  # bump whenever a template, an example or a validation rule changes

KINDS = ("retrieval", "bitext", "sts", "classification")

QUESTION_TYPES = {
    "keywords": "a few keywords or a short phrase, as typed into a search engine, that would find the Passage",
    "acquire_knowledge": "a question asking for a fact, an explanation or a piece of knowledge that the Passage "
                         "provides",
    "summary": "a request for a summary or an overview of the main points of the Passage",
    "yes_or_no": "a question that the Passage answers with yes or no",
    "background": "a question about the context, causes or history behind what the Passage describes",
}
DIFFICULTIES = {
    "high_school": "answerable with general knowledge and a quick read of the Passage",
    "university": "needs some domain knowledge, or combining several facts of the Passage",
    "phd": "needs expert knowledge, careful reasoning or a precise technical detail of the Passage",
}

# The instruction each pair is trained with (SPEC 1: `Instruct: {task}\nQuery:{query}`).
INSTRUCTIONS = {
    "retrieval": "Given a web search query, retrieve relevant passages that answer the query",
    "bitext": "Retrieve parallel sentences",
    "sts": "Retrieve semantically similar text",
    "classification": "Classify the topic of the given text",
}
SYMMETRIC = {"bitext", "sts"}  # the instruction goes on both sides (SPEC 1)

_EXAMPLE_PASSAGES = [
    "The mitochondrion is an organelle found in most eukaryotic cells. It generates most of the cell's "
    "supply of ATP through oxidative phosphorylation, which is why it is called the powerhouse of the cell.",
    "The Peace of Westphalia (1648) ended the Thirty Years' War. Historians often credit it with the "
    "principle of state sovereignty, although recent scholarship questions how far the treaties intended this.",
    "A 2011 review of randomised trials found that stretching before running did not significantly "
    "reduce the risk of injury among recreational runners.",
]

CONFIGURATION_EXAMPLES = [
    (_EXAMPLE_PASSAGES[0],
     ["A high school biology teacher preparing a lesson on cells", "A marathon runner interested in nutrition",
      "A journalist covering the pharmaceutical industry"],
     {"Character": "A high school biology teacher preparing a lesson on cells",
      "Question_Type": "acquire_knowledge", "Difficulty": "high_school"}),
    (_EXAMPLE_PASSAGES[1],
     ["A tourist planning a trip to Germany",
      "A PhD student in political science researching the origins of international law",
      "A collector of antique maps"],
     {"Character": "A PhD student in political science researching the origins of international law",
      "Question_Type": "background", "Difficulty": "phd"}),
    (_EXAMPLE_PASSAGES[2],
     ["A recreational runner training for a first half marathon", "A physiotherapy student",
      "A software engineer who likes hiking"],
     {"Character": "A recreational runner training for a first half marathon",
      "Question_Type": "yes_or_no", "Difficulty": "high_school"}),
]

QUERY_EXAMPLE = (
    "A high school biology teacher preparing a lesson on cells", _EXAMPLE_PASSAGES[0],
    "acquire_knowledge", "high_school", 8, "English", {"Query": "How do mitochondria produce energy for the cell?"})


def _characters(candidates: Sequence[str]) -> str:
    return "\n".join(f"{i}. {c}" for i, c in enumerate(candidates, 1))


def _options(options: dict[str, str]) -> str:
    return "\n".join(f"- {k}: {v}" for k, v in options.items())


def example_outputs() -> list[str]:
    """The texts and answers the templates show as examples: an answer that repeats one is a
    copy (`check_text` rejects it)."""
    return [QUERY_EXAMPLE[-1]["Query"], "Le musée est fermé le lundi.", "On the stage, a guy plays the guitar.",
            "A man is playing a guitar on the stage.", "The museum is closed on Mondays.", *_EXAMPLE_PASSAGES]


def _configuration_example(i: int, n: int) -> str:
    """CONFIGURATION_EXAMPLES[i], shown as the n-th example."""
    passage, candidates, output = CONFIGURATION_EXAMPLES[i]
    return (f"<Example{n + 1}>\n**Passage**:\n{passage}\n**Character**:\n{_characters(candidates)}\n"
            f"**output**:\n{json.dumps(output, ensure_ascii=False)}\n</Example{n + 1}>")


def _requirement(qtype: str, difficulty: str, length: int, language: str) -> str:
    return (f"- Type: {qtype};\n- Difficulty: {difficulty};\n"
            f"- Length: the length of the generated sentences should be {length} words;\n"
            f"- Language: the language in which the results are generated should be {language} language;")


def configuration_prompt(passage: str, candidates: Sequence[str], language: str, *,
                         prefill: bool = False, example_order: Sequence[int] | None = None) -> Messages:
    """Stage 1 of retrieval synthesis: the paper's configuration template (A.1). The instructions
    and examples are the system turn; the **Passage** / **Character** the template says come "from
    user" are the user turn. `example_order` shows the examples in that order (shard.py draws one
    per passage: a small generator answers with the last example's Question_Type and Difficulty)."""
    order = range(len(CONFIGURATION_EXAMPLES)) if example_order is None else example_order
    if sorted(order) != list(range(len(CONFIGURATION_EXAMPLES))):
        raise ValueError(f"example_order must be a permutation of 0..{len(CONFIGURATION_EXAMPLES) - 1}, "
                         f"got {list(order)}")
    examples = "\n".join(_configuration_example(i, n) for n, i in enumerate(order))
    system = (
        "Given a **Passage** and **Character**, select the appropriate option from three fields: Character, "
        "Question_Type, Difficulty, and return the output in JSON format.\n"
        "First, select the Character who are likely to be interested in the Passage from the candidates. "
        "Then select the Question_Type that the Character might ask about the Passage; Finally, choose the "
        "Difficulty of the possible question based on the Passage, the Character, and the Question_Type.\n"
        "Character: Given by input **Character**\n\n"
        f"Question_Type:\n{_options(QUESTION_TYPES)}\n\n"
        f"Difficulty:\n{_options(DIFFICULTIES)}\n\n"
        f"Here are some examples\n{examples}\n\n"
        "Now, generate the **output** based on the **Passage** and **Character** from user, the **Passage** "
        f"will be in {language} language and the **Character** will be in English.\n"
        "Ensure to generate only the JSON output with content in English.")
    user = f"**Passage**:\n{passage}\n**Character**:\n{_characters(candidates)}"
    return _messages(system, user, '{"Character": "' if prefill else None)


def query_prompt(character: str, passage: str, qtype: str, difficulty: str, length: int, *,
                 corpus_language: str, query_language: str, prefill: bool = False) -> Messages:
    """Stage 2 of retrieval synthesis: the paper's query-generation template (A.1)."""
    ex_char, ex_passage, ex_type, ex_diff, ex_len, ex_lang, ex_out = QUERY_EXAMPLE
    system = (
        "Given a **Character**, **Passage**, and **Requirement**, generate a query from the **Character**'s "
        "perspective that satisfies the **Requirement** and can be used to retrieve the **Passage**. "
        "Please return the result in JSON format.\n\n"
        "Here is an example: the first request from user and its **output**.\n\n"
        "Now, generate the **output** based on the **Character**, **Passage** and **Requirement** from user, "
        f"the **Passage** will be in {corpus_language} language, the **Character** and **Requirement** will be "
        "in English.\n"
        f"Ensure to generate only the JSON output, with the key in English and the value in {query_language} "
        "language.")
    user = _query_request(character, passage, qtype, difficulty, length, query_language)
    example = (_query_request(ex_char, ex_passage, ex_type, ex_diff, ex_len, ex_lang), json.dumps(ex_out))
    return _messages(system, user, '{"Query": "' if prefill else None, example=example)


def _query_request(character: str, passage: str, qtype: str, difficulty: str, length: int,
                   language: str) -> str:
    return (f"**Character**\n{character}\n\n**Passage**\n{passage}\n\n**Requirement**\n"
            f"{_requirement(qtype, difficulty, length, language)}")


def bitext_prompt(text: str, source_language: str, target_language: str, *, prefill: bool = False) -> Messages:
    """Bitext mining: translate the passage's lead sentence(s)."""
    system = (
        "Given a **Text**, translate it into the **Target** language, keeping its meaning, names and numbers. "
        "Please return the result in JSON format.\n\n"
        "Here is an example: the first request from user and its **output**.\n\n"
        f"Now, generate the **output** based on the **Text** and **Target** from user, the **Text** will be in "
        f"{source_language} language.\n"
        f"Ensure to generate only the JSON output, with the key in English and the value in {target_language} "
        "language.")
    user = f"**Text**\n{text}\n**Target**\n{target_language}"
    example = ("**Text**\nThe museum is closed on Mondays.\n**Target**\nFrench",
               '{"Translation": "Le musée est fermé le lundi."}')
    return _messages(system, user, '{"Translation": "' if prefill else None, example=example)


STS_SCALE = {
    5: "the same meaning in different words (a paraphrase)",
    4: "mostly equivalent; some unimportant details differ",
    3: "roughly equivalent; some important information differs or is missing",
    2: "not equivalent, but shares some details",
    1: "not equivalent, but on the same topic",
    0: "unrelated",
}


def sts_prompt(sentence: str, similarity: float, language: str, *, prefill: bool = False) -> Messages:
    """STS: write a sentence with a target similarity (0-5 scale of STS Benchmark) to the lead sentence."""
    scale = "\n".join(f"- {k}: {v}" for k, v in STS_SCALE.items())
    system = (
        "Given a **Sentence** and a **Similarity** score, write a new sentence whose semantic similarity to the "
        "**Sentence** is that score on this scale:\n"
        f"{scale}\n"
        "Do not copy the **Sentence**. Please return the result in JSON format.\n\n"
        "Here is an example: the first request from user and its **output**.\n\n"
        "Now, generate the **output** based on the **Sentence** and **Similarity** from user.\n"
        f"Ensure to generate only the JSON output, with the key in English and the value in {language} language.")
    user = f"**Sentence**\n{sentence}\n**Similarity**\n{similarity:g}"
    example = ("**Sentence**\nA man is playing a guitar on the stage.\n**Similarity**\n5",
               '{"Sentence": "On the stage, a guy plays the guitar."}')
    return _messages(system, user, '{"Sentence": "' if prefill else None, example=example)


def classification_prompt(passage: str, labels: Sequence[str], language: str, *,
                          prefill: bool = False) -> Messages:
    """Classification: pick the topic label of the passage from the label set."""
    system = (
        "Given a **Passage** and a list of **Labels**, choose the Label that best describes the topic of the "
        "Passage and write a short Description of the Passage's topic. Please return the result in JSON format.\n\n"
        "Here is an example: the first request from user and its **output**.\n\n"
        f"Now, generate the **output** based on the **Passage** and **Labels** from user, the **Passage** will be "
        f"in {language} language.\n"
        "Ensure to generate only the JSON output, with the keys in English and the Label copied from the list.")
    user = f"**Passage**\n{passage}\n**Labels**\n" + "\n".join(f"- {x}" for x in labels)
    example = (f"**Passage**\n{_EXAMPLE_PASSAGES[2]}\n**Labels**\n- health\n- sports\n- politics",
               '{"Label": "health", "Description": "Running injuries and whether stretching prevents them."}')
    return _messages(system, user, '{"Label": "' if prefill else None, example=example)


def _messages(system: str, user: str, prefill: str | None, *,
              example: tuple[str, str] | None = None) -> Messages:
    """The chat of one request. `example` (a request and its answer) is a demonstration turn before
    the real request: SmolLM2 copied the answer of an example written inside the instructions into
    ~70% of its English queries, of a demonstration turn into ~35%."""
    msgs = [{"role": "system", "content": system}]
    if example:
        msgs += [{"role": "user", "content": example[0]}, {"role": "assistant", "content": example[1]}]
    msgs.append({"role": "user", "content": user})
    if prefill:
        # Start the answer with the JSON's first key: small models then keep the format
        # (see generators.py).
        msgs.append({"role": "assistant", "content": prefill})
    return msgs
