"""Generated labelled data sets for tests, benchmarks and quality measurement (no network here).

Kinds (each returns JSONL-ready dicts):
- sentiment: {"text", "label": "positive"|"negative"}; reviews whose label needs the whole
  sentence (negation, "A, but B", expectations overturned), not one keyword;
- topics: {"text", "labels": 1-3 of TOPICS}, news-like sentences joining topic fragments;
- entities: CoNLL-2003 style NER (PER, LOC, ORG, MISC); format "tokens" gives {"tokens", "tags"}
  in IOB2, format "text" gives {"text", "entities": [{"start", "end", "label"}]} (end exclusive);
- squad: SQuAD v1.1 {"context", "question", "answers": {"text": [..], "answer_start": [..]}},
  contexts carrying distractor facts of the answer's type;
- generation: {"prompt": "Review: ...\\nSentiment:", "completion": " positive"} on sentiment.

Determinism: every call seeds its own random.Random from the string "kind:seed:split" (string
seeds are hashed with SHA-512, not hash(), so PYTHONHASHSEED does not matter) and never iterates
a set, so the same (n, seed, split) gives identical output on every run and machine.

Held out: the "train" and "test" splits draw names, places, organisations, events, nationalities
and product/venue nouns from disjoint pools, and each split has sentence templates of its own (and,
for sentiment, most of its opinion words and phrases), so a test-split score measures
generalisation rather than memorised fillers.
"""

from __future__ import annotations

import argparse
import json
import random
import re
from pathlib import Path

SPLITS = ("train", "test")
TOPICS = ("sports", "politics", "technology", "health", "business", "entertainment")
ENTITY_TYPES = ("PER", "LOC", "ORG", "MISC")


def _t(s: str) -> tuple[str, ...]:
    return tuple(x.strip() for x in s.split("|"))


# Slot-filler pools: (train, test), disjoint. First names and surnames include common words
# (Rose, Will, Hope, Grant, Bill, Price, King) that the NER templates also use as plain words.
_POOLS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "first": (_t("James|Mary|Robert|Linda|Michael|Sarah|David|Karen|Thomas|Emma|Daniel|Laura|Peter|Helen|"
                 "Paul|Grace|Mark|Rose|Will|Hope|Frank|Victoria|Carlos|Yuki|Ahmed|Ingrid|Pierre|Sofia|Ivan|Priya"),
              _t("John|Patricia|William|Barbara|Richard|Susan|Joseph|Nancy|Charles|Lisa|Matthew|Betty|Andrew|"
                 "Ruth|Bill|Joy|Faith|Jack|Olga|Kenji|Omar|Astrid|Jean|Lucia|Dmitri|Anjali|Miguel|Fatima|Lars|Amara")),
    "last": (_t("Smith|Baker|Young|Grant|Brown|Miller|Wilson|Moore|Taylor|Clark|Walker|Hall|Rivera|Kowalski|"
                "Tanaka|Haddad|Larsen|Dubois|Rossi|Petrov|Sharma|Okafor|Fischer|Novak|Santos"),
             _t("Johnson|Cook|King|Price|Davis|Garcia|Martin|Lewis|Lee|Allen|Wright|Hill|Green|Adams|"
                "Nakamura|Mansour|Berg|Laurent|Bianchi|Volkov|Gupta|Mensah|Weber|Horvat|Costa")),
    "city": (_t("London|Paris|Berlin|Madrid|Tokyo|Sydney|Toronto|Chicago|Cairo|Mumbai|Buenos Aires|Hong Kong|"
                "Rio de Janeiro|Los Angeles|Cape Town"),
             _t("Rome|Vienna|Lisbon|Dublin|Seoul|Melbourne|Montreal|Boston|Lagos|Delhi|Santiago|Kuala Lumpur|"
                "San Francisco|New York|Istanbul")),
    "country": (_t("France|Germany|Japan|Brazil|Kenya|Canada|Australia|India|New Zealand|South Africa|Mexico|Norway"),
                _t("Italy|Spain|South Korea|Argentina|Nigeria|Sweden|Egypt|Chile|Poland|Vietnam|Portugal|Ireland")),
    "company": (_t("Apex Systems|Northwind Traders|Bluefield Energy|Orion Motors|Helix Pharma|Summit Bank|"
                   "Vantage Media|Redstone Mining|Cobalt Labs|Meridian Foods"),
                _t("Quantum Dynamics|Silverline Airways|Granite Insurance|Nova Robotics|Evergreen Textiles|"
                   "Pioneer Steel|Lumen Networks|Harbor Logistics|Atlas Biotech|Crescent Retail")),
    "team": (_t("Manchester United|Ajax Amsterdam|Juventus|Celtic|Benfica|Galatasaray|Leeds United|River Plate"),
             _t("Arsenal|Bayern Munich|AC Milan|Rangers|Sporting Lisbon|Fenerbahce|Everton|Boca Juniors")),
    "inst": (_t("United Nations|European Commission|World Bank|Red Cross"),
             _t("NATO|World Health Organization|International Monetary Fund|African Union")),
    "news": (_t("Reuters|the BBC|Le Monde|CNN"), _t("Associated Press|Al Jazeera|El Pais|Bloomberg")),
    "nat": (_t("German|French|Japanese|Brazilian|Kenyan|Australian|Indian|Norwegian"),
            _t("Italian|Spanish|Korean|Argentine|Nigerian|Swedish|Egyptian|Polish")),
    "event": (_t("World Cup|Davis Cup|Champions League|Tour de France"),
              _t("Ryder Cup|Olympic Games|Europa League|Monaco Grand Prix")),
    "product": (_t("phone|laptop|blender|vacuum cleaner|backpack|coffee maker|monitor|keyboard"),
                _t("tablet|camera|kettle|speaker|printer|toaster|smartwatch|microwave")),
    "movie": (_t("film|movie|thriller|comedy|horror film|western"),
              _t("documentary|sequel|drama|musical|animated film|war film")),
    "venue": (_t("restaurant|diner|cafe|bistro|sushi bar|burger place"),
              _t("steakhouse|bakery|pizzeria|noodle bar|taco stand|tea room")),
}
_DAYS = _t("Monday|Tuesday|Wednesday|Thursday|Friday|Saturday|Sunday")
_MONTHS = _t("January|February|March|April|May|June|July|August|September|October|November|December")


def _check_split(split: str) -> int:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, not {split!r}")
    return SPLITS.index(split)


def pool(name: str, split: str) -> tuple[str, ...]:
    """The filler pool `name` of one split (public so tests can check the splits are disjoint)."""
    return _POOLS[name][_check_split(split)]


def _templates(items: tuple[str, ...], split: str) -> list[str]:
    """Templates prefixed "<" are train-only, ">" test-only; the rest are shared."""
    own, other = ("<", ">") if split == "train" else (">", "<")
    return [t.lstrip(own) for t in items if not t.startswith(other)]


def _rng(kind: str, seed: int, split: str) -> random.Random:
    _check_split(split)
    return random.Random(f"{kind}:{seed}:{split}")


def _person(r: random.Random, split: str) -> str:
    return f"{r.choice(pool('first', split))} {r.choice(pool('last', split))}"


def _cap(s: str) -> str:
    return s[0].upper() + s[1:]


# ---------------------------------------------------------------- sentiment
# Sentiment words and phrases follow the templates' notation ("<" train only, ">" test only): most of
# the test split's are never seen in training, as in real held-out reviews, so a test score measures
# what the model knows of the words, not which ones it was shown. A few common ones are shared.
_POS = ("great|<excellent|<wonderful|<fantastic|<superb|<impressive|<delightful|>lovely|>solid|>pleasant|"
        ">brilliant|>outstanding|>marvellous")
_NEG = ("terrible|<awful|<disappointing|<bland|<poor|<mediocre|<dreadful|>clumsy|>frustrating|>weak|>dull|"
        ">unpleasant|>lousy")
_MILD_NEG = "bad|<disappointing|>a letdown"  # "not bad at all" reads as positive
_INTENS = ("", "", "", "very ", "really ", "extremely ", "truly ", "incredibly ", "surprisingly ")
_DOMAINS = {  # pool of nouns, aspects, openers ({n} the noun, {w} when)
    "product": ("product", _t("battery|screen|build quality|price|setup|design|sound|customer support"),
                _t("I bought this {n} {w}|I started using the {n} {w}|<My sister gave me this {n} {w}|"
                   ">The {n} arrived {w}")),
    "movie": ("movie", _t("acting|plot|soundtrack|pacing|dialogue|ending|script|cast"),
              _t("I watched this {n} {w}|We saw the {n} at the cinema {w}|<I rented the {n} {w}|"
                 ">My friends took me to see the {n} {w}")),
    "restaurant": ("venue", _t("service|food|dessert|staff|wine list|atmosphere|menu|coffee"),
                   _t("We had dinner at this {n} {w}|I visited the {n} with my family {w}|"
                      "<We stopped at the {n} for lunch {w}|>I took my parents to the {n} {w}")),
}
_WHEN = _t("last week|last month|over the weekend|a few days ago|on Friday|in the spring|after work")


def _pick(r: random.Random, items: str, split: str) -> str:
    """One of the "|"-separated items the split may use."""
    return r.choice(_templates(_t(items), split))


def _clause(r: random.Random, pos: bool, aspects: tuple[str, ...], a: str, split: str, verdict: bool = True) -> str:
    """A clause about aspect `a` with sentiment `pos`: direct, negated, or (if `verdict`) overall."""
    kind = r.randrange(6 if verdict else 5)
    if kind == 0:
        return f"the {a} was {r.choice(_INTENS)}{_pick(r, _POS if pos else _NEG, split)}"
    if kind == 1:  # negation flips the adjective
        if pos:
            return f"the {a} was not {_pick(r, _MILD_NEG, split)} at all" if r.random() < .6 else \
                f"the {a} was far from {_pick(r, _NEG, split)}"
        return f"the {a} was not {_pick(r, _POS, split)}" if r.random() < .6 else \
            f"the {a} was hardly {_pick(r, _POS, split)}"
    if kind == 2:
        return f"I {_pick(r, 'loved|<enjoyed|<adored|>really liked|>was delighted by', split)} the {a}" if pos else \
            f"I {_pick(r, 'hated|<disliked|<could not stand|>was let down by|>was annoyed by', split)} the {a}"
    if kind == 3:  # negated verbs
        return _pick(r, "<I have no complaints about the {a}|<nothing about the {a} disappointed me|"
                        ">I could not find a single flaw in the {a}|>the {a} left nothing to be desired",
                     split).format(a=a) if pos else \
            _pick(r, "<I didn't love the {a}|<the {a} did not impress me|>I wasn't happy with the {a}|"
                     ">I didn't enjoy the {a} one bit", split).format(a=a)
    if kind == 5:  # overall verdicts only where the clause decides the label
        return _pick(r, "<it was worth every penny|<it exceeded my expectations|>it was a pleasant surprise|"
                        ">it was money well spent", split) if pos else \
            _pick(r, "<it was a waste of money|<it fell far short of my expectations|>it was not worth it|"
                     ">it was a total disappointment", split)
    other = r.choice([x for x in aspects if x != a])  # kind 4: two aspects, one judgement
    return f"the {a} and the {other} were both {_pick(r, _POS if pos else _NEG, split)}"


def _review(r: random.Random, pos: bool, split: str) -> str:
    noun_pool, aspects, openers = _DOMAINS[r.choice(list(_DOMAINS))]
    sentences = []
    if r.random() < .5:
        opener = r.choice(_templates(openers, split))
        sentences.append(opener.format(n=r.choice(pool(noun_pool, split)), w=r.choice(_WHEN)))
    k = r.random()
    a, b, c = r.sample(aspects, 3)  # distinct aspects: "the food was bad, but the food was good" is noise
    good, bad = _clause(r, pos, aspects, a, split), _clause(r, not pos, aspects, b, split, verdict=False)
    if k < .35:  # the clause after "but"/"however" carries the verdict
        contrast = r.choice(_templates(_t("{bad}, but {good}|although {bad}, {good}|{good}, even though {bad}|"
                                          "<{bad}, yet {good}|<{bad}, but overall {good}|"
                                          ">despite the fact that {bad}, {good}|>{bad}; however, {good}"), split))
        sentences.append(contrast.format(good=good, bad=bad))
    elif k < .5:  # expectations overturned
        hope = _pick(r, "I expected to hate it|<I was ready to be bored|>I had low hopes" if pos
                     else "I really wanted to love it|<I had high hopes|>Everyone told me it was great", split)
        sentences.append(f"{hope}, but {good}")
    else:
        sentences.append(good)
        if r.random() < .4:
            sentences.append(_clause(r, pos, aspects, c, split))
    if r.random() < .3:
        sentences.append(_pick(r, "<I would definitely recommend it|<I would happily do it again|"
                                  ">I am glad I gave it a chance|>I will be back for more" if pos else
                                  "<I would not recommend it|<I would not do it again|>I wish I had skipped it|"
                                  ">I will not be going back", split))
    return " ".join(_cap(s) + "." for s in sentences)


def sentiment(n: int, seed: int = 0, split: str = "train") -> list[dict]:
    """Exactly balanced (labels alternate, then shuffled); 6-40 words each."""
    r = _rng("sentiment", seed, split)
    labels = ["positive" if i % 2 == 0 else "negative" for i in range(n)]
    r.shuffle(labels)
    out = []
    for label in labels:
        text = _review(r, label == "positive", split)
        while not 6 <= len(text.split()) <= 40:
            text = _review(r, label == "positive", split)
        out.append({"text": text, "label": label})
    return out


def generation(n: int, seed: int = 0, split: str = "train") -> list[dict]:
    """The sentiment examples as prompt/completion pairs for generation adapters."""
    return [{"prompt": f"Review: {e['text']}\nSentiment:", "completion": f" {e['label']}"}
            for e in sentiment(n, seed, split)]


# ---------------------------------------------------------------- topics
_FRAGMENTS = {  # {p} person, {c} company, {t}/{u} teams, {y} city, {k} country, {x} a number
    "sports": _t("{t} beat {u} {x}-1 in front of a home crowd|{p} signed a new contract with {t}|"
                 "the coach of {t} was sacked after a fifth straight defeat|{p} qualified for the marathon final|"
                 "<{p} broke the national record in the 400 metres|>{t} reached the cup final on penalties"),
    "politics": _t("parliament in {k} voted on the new election law|"
                   "the opposition leader {p} called for early elections|"
                   "the foreign minister of {k} resigned over a budget dispute|lawmakers debated a bill on immigration|"
                   "<the president of {k} vetoed a tax reform|>voters in {k} rejected the constitutional referendum"),
    "technology": _t("{c} unveiled a faster chip for smartphones|a software update from {c} fixed a security flaw|"
                     "engineers in {y} tested a new artificial intelligence model|"
                     "a startup in {y} launched a cloud platform|"
                     "<{c} delayed the launch of its self-driving software|>hackers breached the servers of {c}"),
    "health": _t("doctors in {y} reported fewer flu cases this winter|"
                 "a clinical trial of a new vaccine showed promising results|"
                 "hospitals in {k} warned of a shortage of nurses|researchers linked poor sleep to heart disease|"
                 "<a measles outbreak closed schools in {y}|"
                 ">the health ministry of {k} approved a cheaper cancer drug"),
    "business": _t("shares of {c} fell {x} percent|{c} agreed to buy a rival for {x}00 million dollars|"
                   "the central bank of {k} raised interest rates|retail sales in {k} rose {x} percent|"
                   "<{c} reported record quarterly profits|>investors dumped bonds issued by {c}"),
    "entertainment": _t("the film starring {p} topped the box office|{p} released a new album|"
                        "a streaming series set in {y} won three awards|the music festival in {y} sold out|"
                        "<{p} will host the awards ceremony|>a sold-out concert by {p} opened the tour"),
}
_JOIN = _t("{a}, and {b}|{a}; meanwhile, {b}|{a}. In other news, {b}|{a} while {b}|<{a}, as {b}|>{a}. Separately, {b}")


def _fragment(r: random.Random, topic: str, split: str) -> str:
    t, u = r.sample(pool("team", split), 2)
    return r.choice(_templates(_FRAGMENTS[topic], split)).format(
        p=_person(r, split), c=r.choice(pool("company", split)), t=t, u=u, y=r.choice(pool("city", split)),
        k=r.choice(pool("country", split)), x=r.randint(2, 9))


def topics(n: int, seed: int = 0, split: str = "train") -> list[dict]:
    """1, 2 and 3 labels in equal shares (cycled, then shuffled); labels in TOPICS order."""
    r = _rng("topics", seed, split)
    counts = [1 + i % 3 for i in range(n)]
    r.shuffle(counts)
    joins = _templates(_JOIN, split)
    out = []
    for k in counts:
        labels = r.sample(TOPICS, k)
        text = _fragment(r, labels[0], split)
        for topic in labels[1:]:
            text = r.choice(joins).format(a=text, b=_fragment(r, topic, split))
        out.append({"text": _cap(text) + ".", "labels": [t for t in TOPICS if t in labels]})
    return out


# ---------------------------------------------------------------- entities
# Templates are pre-tokenised CoNLL style (every token space-separated). {PER} etc. are entity
# slots; {NUM} {PCT} {SCORE} {DAY} {MONTH} are plain fillers tagged O.
_SLOTS = {"PER": ("PER", None), "SURNAME": ("PER", "last"), "CITY": ("LOC", "city"), "COUNTRY": ("LOC", "country"),
          "TEAM": ("ORG", "team"), "COMPANY": ("ORG", "company"), "INST": ("ORG", "inst"), "NEWS": ("ORG", "news"),
          "NAT": ("MISC", "nat"), "EVENT": ("MISC", "event")}
_NER = _t(
    "{TEAM} beat {TEAM} {SCORE} in {CITY} on {DAY} .|{PER} scored twice as {TEAM} won {SCORE} .|"
    "{NAT} striker {PER} joined {TEAM} on a {NUM}-year contract .|"
    "{PER} , the {NAT} foreign minister , arrived in {CITY} on {DAY} for talks with {SURNAME} .|"
    "Shares in {COMPANY} rose {PCT} percent after the company said profits will grow .|"
    "{COMPANY} said on {DAY} it would cut {NUM}00 jobs in {COUNTRY} .|"
    "The {INST} will grant {COUNTRY} a loan of {NUM}00 million dollars , officials said .|"
    "Police said the main market in {CITY} was closed on {DAY} .|Rain stopped play after {NUM}0 overs on {DAY} .|"
    "Prices rose {PCT} percent in {MONTH} , the statistics office said .|"
    "{PER} told {NEWS} there was little hope of a deal before {MONTH} .|"
    "Tourists flocked to {CITY} and {CITY} during the {EVENT} .|{PER} won the {EVENT} title in {CITY} .|"
    "{COUNTRY} 's prime minister , {PER} , said the talks would resume in {CITY} .|"
    "Investors welcomed the {NAT} central bank 's decision to cut rates .|"
    "{TEAM} coach {PER} said his side would play {TEAM} without {SURNAME} .|"
    "Hope faded on {DAY} for the missing sailors , {NEWS} said .|"
    "Lawmakers passed the bill by {NUM}0 votes after a long debate .|"
    "Will the talks succeed ? {SURNAME} said it was too early to tell .|Traders said the price of gold was steady .|"
    "<{PER} flew from {CITY} to {CITY} on {DAY} .|"
    "<The deal values {COMPANY} at {NUM}00 million dollars , {NEWS} reported .|"
    "<No one was injured in the fire , police said .|<{PER} and {PER} will meet in {CITY} next {MONTH} .|"
    ">After a {NUM}-hour flight , {PER} landed in {CITY} .|"
    ">Analysts at {COMPANY} expect {COUNTRY} to grow {PCT} percent .|"
    ">Mark your diaries : the {EVENT} opens in {CITY} in {MONTH} .|>The storm forced {NUM} flights to turn back .")
_NO_SPACE_BEFORE = {",", ".", ":", "?", "'s"}


def _entity_tokens(r: random.Random, split: str) -> list[tuple[str, str]]:
    """One sentence as (token, IOB2 tag) pairs; repeated slots of one kind get distinct fillers."""
    fill = {"NUM": str(r.randint(2, 9)), "PCT": f"{r.randint(1, 9)}.{r.randint(0, 9)}", "DAY": r.choice(_DAYS),
            "SCORE": f"{r.randint(1, 5)}-{r.randint(0, 1)}", "MONTH": r.choice(_MONTHS)}
    used: set[str] = set()
    out = []
    for tok in r.choice(_templates(_NER, split)).split():
        m = re.fullmatch(r"\{(\w+)\}", tok)
        if not (m and m.group(1) in _SLOTS):
            out.append((tok.format(**fill), "O"))
            continue
        label, name = _SLOTS[m.group(1)]
        value = _person(r, split) if name is None else r.choice(pool(name, split))
        while value in used:
            value = _person(r, split) if name is None else r.choice(pool(name, split))
        used.add(value)
        words = value.split()
        if words[0] == "the":  # "the BBC": the article is O, as in CoNLL
            out.append(("the", "O"))
            words = words[1:]
        out += [(w, ("B-" if i == 0 else "I-") + label) for i, w in enumerate(words)]
    return out


def entities(n: int, seed: int = 0, split: str = "train", format: str = "tokens") -> list[dict]:
    """0-4 entities a sentence; format "text" detokenises the same sentences (punctuation attached)."""
    if format not in ("tokens", "text"):
        raise ValueError(f"format must be 'tokens' or 'text', not {format!r}")
    r = _rng("entities", seed, split)
    out = []
    for _ in range(n):
        pairs = _entity_tokens(r, split)
        if format == "tokens":
            out.append({"tokens": [t for t, _ in pairs], "tags": [g for _, g in pairs]})
            continue
        text, spans = "", []
        for tok, tag in pairs:
            text += ("" if not text or tok in _NO_SPACE_BEFORE else " ")
            start, text = len(text), text + tok
            if tag.startswith("B-"):
                spans.append({"start": start, "end": len(text), "label": tag[2:]})
            elif tag.startswith("I-"):
                spans[-1]["end"] = len(text)
        out.append({"text": text, "entities": spans})
    return out


# ---------------------------------------------------------------- squad
# A family: sentence slots (each a tuple of variants, the first always used, later ones optional)
# and (question, answer key) pairs; a question is asked only if every key it names is in context.
_SQUAD = {
    "company": ((_t("<{O1} was founded by {P1} in {C1} in {Y1}.|>{P1} established {O1} in {C1} in {Y1}."),
                 _t("<Its rival, {O2}, was started by {P2} in {C2} in {Y2}.|"
                    ">{P2} set up {O2}, a competitor, in {C2} in {Y2}."),
                 _t("By {Y3}, {O1} employed {N1} people, while {O2} had {N2}."),
                 _t("{P1} had earlier studied {F1} in {C3}."), _t("{P2} trained in {F2} before going into business.")),
                _t("Who founded {O1}?:P1|Who started {O2}?:P2|Where was {O1} founded?:C1|"
                   "In which city was {O2} started?:C2|When was {O1} founded?:Y1|In what year was {O2} started?:Y2|"
                   "How many people did {O1} employ in {Y3}?:N1|How many employees did {O2} have in {Y3}?:N2|"
                   "What did {P1} study?:F1|Which company did {P2} start?:O2|"
                   "Where did {P1} study {F1}?:C3|What did {P2} train in?:F2")),
    "match": ((_t("<{T1} beat {T2} {S} in {C1} on {D1}.|>{T1} defeated {T2} {S} in {C1} on {D1}."),
               _t("{P1} scored {K} goals for {T1}, and {P2} replied for {T2}."),
               _t("A crowd of {N1} watched the match."), _t("A week earlier {T2} had beaten {T3} in {C2} on {D2}."),
               _t("{P3}, the coach of {T1}, praised the defence.")),
              _t("Which team did {T1} beat on {D1}?:T2|Who scored {K} goals for {T1}?:P1|Who scored for {T2}?:P2|"
                 "Where did {T1} beat {T2}?:C1|When did {T1} play {T2}?:D1|What was the score when {T1} beat {T2}?:S|"
                 "How many people watched {T1} play {T2}?:N1|Who coaches {T1}?:P3|Where did {T2} beat {T3}?:C2|"
                 "When did {T2} beat {T3}?:D2|How many goals did {P1} score?:K")),
    "bio": ((_t("<{P1} was born in {C1} in {Y1}.|>Born in {C1} in {Y1}, {P1} grew up by the sea."),
             _t("{P2}, a childhood friend, was born in {C2} in {Y2}."),
             _t("In {Y3}, {P1} joined {O1} and led a team of {N1} engineers."), _t("{P1} won the {A1} in {Y4}."),
             _t("{P2} later worked for {O2} in {C3}.")),
            _t("Where was {P1} born?:C1|In which city was {P2} born?:C2|When was {P1} born?:Y1|"
               "In what year was {P2} born?:Y2|Who joined {O1} in {Y3}?:P1|How many engineers did {P1} lead?:N1|"
               "What prize did {P1} win?:A1|When did {P1} win the {A1}?:Y4|Which organisation did {P2} work for?:O2|"
               "Who was born in {C2}?:P2|Where did {P2} work for {O2}?:C3")),
}
_FIELDS = _t("chemistry|law|economics|medicine|physics|architecture|accounting|engineering")
_AWARDS = _t("Turing Award|Pritzker Prize|Fields Medal|Booker Prize|Lasker Award|Abel Prize")


def _squad_values(r: random.Random, split: str) -> dict[str, str]:
    p: list[str] = []
    while len(p) < 3:  # three distinct people: one answers, the others distract
        if (person := _person(r, split)) not in p:
            p.append(person)
    y = sorted(r.sample(range(1950, 2005), 4))
    y1, y2 = r.sample(y[:3], 2)
    v = {f"P{i + 1}": p[i] for i in range(3)}
    v |= dict(zip(("C1", "C2", "C3"), r.sample(pool("city", split), 3)))
    v |= dict(zip(("O1", "O2"), r.sample(pool("company", split), 2)))
    v |= dict(zip(("T1", "T2", "T3"), r.sample(pool("team", split), 3)))
    v |= dict(zip(("F1", "F2"), r.sample(_FIELDS, 2)))
    n1, n2 = r.sample(range(120, 9000), 2)
    day1, day2 = r.sample(range(1, 29), 2)
    v |= {"Y1": str(y1), "Y2": str(y2), "Y3": str(y[3] + r.randint(3, 12)), "Y4": str(y[3] + r.randint(13, 15)),
          "N1": f"{n1:,}", "N2": f"{n2:,}", "D1": f"{day1} {r.choice(_MONTHS)}", "D2": f"{day2} {r.choice(_MONTHS)}",
          "S": f"{r.randint(2, 5)}-{r.randint(0, 1)}", "K": r.choice(_t("two|three|four")), "A1": r.choice(_AWARDS)}
    return v


def _render(template: str, values: dict[str, str], offset: int, first: dict[str, int]) -> str:
    """Fill `template`, recording each key's first character offset in the context."""
    out = ""
    for i, part in enumerate(re.split(r"\{(\w+)\}", template)):
        if i % 2:
            first.setdefault(part, offset + len(out))
            part = values[part]
        out += part
    return out


def squad(n: int, seed: int = 0, split: str = "train") -> list[dict]:
    """2-5 sentence contexts; answer_start points at the answer's first mention."""
    r = _rng("squad", seed, split)
    families = list(_SQUAD)
    out = []
    for _ in range(n):
        slots, questions = _SQUAD[r.choice(families)]
        values = _squad_values(r, split)
        chosen = [slots[0], slots[1]] + [s for s in slots[2:] if r.random() < .6]
        context, first = "", {}
        for variants in chosen:
            context += " " if context else ""
            context += _render(r.choice(_templates(variants, split)), values, len(context), first)
        asks = [q.rsplit(":", 1) for q in questions if q.rsplit(":", 1)[1] in first
                and all(k in first for k in re.findall(r"\{(\w+)\}", q))]
        question, key = r.choice(asks)
        out.append({"context": context, "question": question.format(**values),
                    "answers": {"text": [values[key]], "answer_start": [first[key]]}})
    return out


# ---------------------------------------------------------------- output
KINDS = {"sentiment": sentiment, "topics": topics, "entities": entities, "squad": squad, "generation": generation}


def write_jsonl(path: str | Path, records: list[dict]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for rec in records:
            f.write(json.dumps(rec, ensure_ascii=False) + "\n")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m loraserve.trainer.synthetic", description=__doc__.split("\n")[0])
    ap.add_argument("kind", choices=list(KINDS))
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--split", choices=SPLITS, default="train")
    ap.add_argument("--out", required=True)
    ap.add_argument("--format", choices=("tokens", "text"), default="tokens", help="entities only")
    args = ap.parse_args(argv)
    kw = {"format": args.format} if args.kind == "entities" else {}
    write_jsonl(args.out, KINDS[args.kind](args.n, args.seed, args.split, **kw))


if __name__ == "__main__":
    main()
