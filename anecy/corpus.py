"""A built-in corpus of simple children's stories, already tokenized for Llama 2.

It lets the trainer run offline on a fresh machine, when no TinyStories file is at hand.
The stories are made of a fixed set of pieces (a word with its leading space or line break,
or a run of punctuation), and ``_IDS`` holds the Llama-2 token ids of every piece, so the
stories are encoded exactly as llama2.c pretokenizes TinyStories (BOS, then the SentencePiece
ids of the stripped text, no EOS) without the tokenizer at run time. SentencePiece splits text
at spaces and between letters and punctuation before merging, which is why the ids of a story
are the concatenation of the ids of its pieces; tests/test_corpus.py checks it against the
real tokenizer.
"""

import random
import re
from itertools import chain

import numpy as np

BOS = 1
DEFAULT_TOKENS = 1_500_000
NAME = "built-in corpus"   # how runs, checkpoints and samplers name these tokens

BUILTIN_NOTICE = (
    "no TinyStories token file found: training on anecy's built-in corpus of simple stories; "
    "for real data, pretokenize roneneldan/TinyStories (Hugging Face) with llama2.c's "
    "`tinystories.py pretokenize` and put tinystories_data00.bin in the working directory "
    "or name it with --data PATH or $ANECY_DATA"
)

# Punctuation runs are one piece: SentencePiece merges adjacent punctuation ('!"' is one token).
_PIECE = re.compile(r'(?:\n\n| )"?[A-Za-z\']+|[.,!?]+"?')

# -- the story grammar ------------------------------------------------------------------------

GIRLS = ["Lily", "Mia", "Sue", "Amy", "Anna", "Lucy", "Emma", "Sara"]
BOYS = ["Tom", "Ben", "Max", "Tim", "Sam", "Jack", "Leo", "Bob"]
ANIMALS = ["dog", "cat", "bunny", "bird", "bear", "duck", "frog", "mouse", "fox"]
TRAITS = ["little", "small", "happy", "kind", "curious", "brave", "shy", "silly", "friendly"]
PLACES = {"park": "in", "garden": "in", "forest": "in", "beach": "on", "pond": "by",
          "farm": "on", "hill": "on", "river": "by"}
TOYS = ["ball", "kite", "hat", "doll", "car", "book", "boat", "drum", "balloon", "truck"]
COLORS = ["red", "blue", "green", "yellow", "pink", "big", "shiny", "new"]
HOBBIES = ["play outside", "run and jump", "sing songs", "dance", "draw pictures",
           "read books", "look at the sky", "help {his} mom", "play with {his} friends"]
SPOTS = ["under a big bush", "behind a tree", "near the water", "under a rock",
         "in the tall grass", "next to a flower"]
GOALS = ["climb the big tree", "fly {his} kite", "jump over the log", "swim in the pond",
         "build a tall tower", "ride {his} bike"]
NOISES = ["a little frog", "a small bird", "a lost puppy", "the wind", "a funny cat"]
DAYS = ["One day", "One sunny day", "One morning", "One warm day", "One cold day"]

OPENINGS = [
    "Once upon a time, there was {a_trait} {kind} named {Name}.",
    "Once upon a time, in a small town, there lived {a_trait} {kind} named {Name}.",
    "{Name} was {a_trait} {kind} who lived near the {place}.",
    "There was once {a_trait} {kind}. {His} name was {Name}.",
]
LIKES = [
    "{He} loved to {hobby}.",
    "{Name} liked to {hobby} every day.",
    "{He} had a {color} {toy} that {he} loved very much.",
    "{Name} was very happy, because {he} liked to {hobby}.",
]
ENDINGS = [
    "From that day on, {Name} and {Friend} were best friends.",
    "They played together until the sun went down.",
    "{Name} went home and told {his} mom all about it.",
    "It was the best day ever.",
    "The end.",
]


def _lost(rng):
    return [
        "{Day}, {Name} went to the {place} with {his} {color} {toy}.",
        rng.choice(["{He} played with it all day.", "{He} played and played.",
                    "{He} had so much fun."]),
        rng.choice(["Then {he} looked around, but the {toy} was gone!",
                    "When it was time to go home, {he} could not find {his} {toy}."]),
        rng.choice(["{Name} felt very sad.", "{He} started to cry.", "{Name} was sad."]),
        rng.choice(["{His} friend {Friend} saw {him}.",
                    "A {ftrait} {fkind} named {Friend} came by."]),
        rng.choice(['"Why are you sad?" asked {Friend}.', '{Friend} asked, "What is wrong?"']),
        '"I lost my {toy}," said {Name}.',
        rng.choice(['"Do not worry. I will help you find it," said {Friend}.',
                    '"I will help you!" said {Friend}.']),
        rng.choice(["They looked and looked.", "They looked everywhere.",
                    "They looked behind the trees and under the rocks."]),
        "At last, {Friend} found the {toy} {spot}.",
        '{Name} was so happy. "Thank you, {Friend}!" {he} said.',
    ]


def _share(rng):
    return [
        "{Day}, {Name} was playing with {his} {color} {toy} {at} the {place}.",
        rng.choice(['{Friend} came and said, "Can I play with your {toy}?"',
                    '{Friend} saw the {toy} and asked, "Can I play too?"']),
        rng.choice(["{Name} did not want to share.", "At first, {Name} said no."]),
        "{Friend} felt sad and walked away.",
        rng.choice(["Then {Name} saw that {Friend} was sad.",
                    "{Name} did not like to see {Friend} sad."]),
        '{He} ran to {Friend} and said, "You can play with my {toy} too."',
        rng.choice(["{Friend} smiled.", "{Friend} was very happy."]),
        "They played with the {toy} together.",
        rng.choice(["{Name} learned that sharing is fun.", "Sharing made them both happy."]),
    ]


def _fear(rng):
    return [
        "{Day}, {Name} was {at} the {place} when {he} heard a loud noise.",
        rng.choice(["{He} was scared.", "{Name} felt very scared.", "{He} was afraid."]),
        '{He} ran to {his} mom and said, "Mom, I heard a noise!"',
        rng.choice(['Mom smiled and said, "Let\'s go and look."',
                    'Mom said, "Do not be afraid. Let\'s look together."']),
        "They went to look together. It was just {noise}!",
        rng.choice(["{Name} laughed.", "{Name} smiled."]),
        rng.choice(["{He} was not scared anymore.", "{Name} learned that it is good to be brave."]),
    ]


def _try_again(rng):
    return [
        "{Day}, {Name} wanted to {goal}.",
        rng.choice(["{He} tried, but {he} fell down.", "{He} tried, but it was too hard."]),
        "{Name} felt sad, but {he} did not give up.",
        rng.choice(['{His} friend {Friend} said, "Try again! You can do it!"',
                    '{Friend} said, "Do not give up, {Name}!"']),
        "{Name} tried again and again.",
        rng.choice(["At last, {he} did it!", "This time, {he} did it!"]),
        rng.choice(["{Name} was very proud.", '"I did it!" said {Name}.']),
        "{Name} learned to never give up.",
    ]


PLOTS = [_lost, _share, _fear, _try_again]


def _character(rng, avoid=None):
    human = rng.random() < 0.5
    girl = rng.random() < 0.5
    name = rng.choice(GIRLS if girl else BOYS)
    while name == avoid:
        name = rng.choice(GIRLS if girl else BOYS)
    kind = ("girl" if girl else "boy") if human else rng.choice(ANIMALS)
    return name, kind, girl


def _a(word):
    return ("an " if word[0] in "aeiou" else "a ") + word


def _story(rng):
    # The text starts with a space: every word piece carries one, and SentencePiece's dummy
    # prefix gives the first word of the stripped text the same one.
    name, kind, girl = _character(rng)
    friend, fkind, _ = _character(rng, avoid=name)
    he, his, him = ("she", "her", "her") if girl else ("he", "his", "him")
    slots = dict(Name=name, kind=kind, a_trait=_a(rng.choice(TRAITS)), Friend=friend,
                 fkind=fkind, ftrait=rng.choice(TRAITS), place=rng.choice(list(PLACES)),
                 toy=rng.choice(TOYS), color=rng.choice(COLORS), Day=rng.choice(DAYS),
                 spot=rng.choice(SPOTS), noise=rng.choice(NOISES), he=he, He=he.capitalize(),
                 his=his, His=his.capitalize(), him=him)
    slots["at"] = PLACES[slots["place"]]
    slots["hobby"] = rng.choice(HOBBIES).format(his=his)
    slots["goal"] = rng.choice(GOALS).format(his=his)
    intro = [rng.choice(OPENINGS), rng.choice(LIKES)]
    plot = rng.choice(PLOTS)(rng)
    # TinyStories often starts a paragraph where the plot begins and before the moral
    text = " " + " ".join(intro)
    text += rng.choice([" ", "\n\n"]) + " ".join(plot)
    if rng.random() < 0.6:
        text += rng.choice([" ", "\n\n"]) + rng.choice(ENDINGS)
    return text.format(**slots)


def _stories(seed):
    rng = random.Random(seed)
    while True:
        yield _story(rng)


def builtin_stories(n, seed=0):
    """The first ``n`` stories of the corpus for ``seed``, as text."""
    stories = _stories(seed)
    return [next(stories)[1:] for _ in range(n)]


def _encode(story):
    return chain((BOS,), chain.from_iterable(map(_IDS.__getitem__, _PIECE.findall(story))))


def builtin_tokens(n_tokens=DEFAULT_TOKENS, seed=0):
    """``n_tokens`` Llama-2 token ids of the corpus for ``seed`` (uint16), laid out like a
    llama2.c pretokenized TinyStories file: each story is BOS followed by its ids."""
    if n_tokens <= 0:
        raise ValueError(f"n_tokens must be positive, got {n_tokens}")
    ids = []
    for story in _stories(seed):
        ids.extend(_encode(story))
        if len(ids) >= n_tokens:
            return np.array(ids[:n_tokens], dtype=np.uint16)


# Derived once with SentencePiece from llama2.c's tokenizer.model, each piece encoded after
# the word "a" so that it gets the ids it has inside a story.
_IDS = {
    '\n\nAmy': (13, 13, 29909, 1357), '\n\nAnna': (13, 13, 2744, 1056), '\n\nBen': (13, 13, 20841),
    '\n\nBob': (13, 13, 29362), '\n\nEmma': (13, 13, 6026, 655), '\n\nFrom': (13, 13, 4591),
    '\n\nIt': (13, 13, 3112), '\n\nJack': (13, 13, 27006), '\n\nLeo': (13, 13, 3226, 29877),
    '\n\nLily': (13, 13, 29931, 2354), '\n\nLucy': (13, 13, 24126, 1270),
    '\n\nMax': (13, 13, 7976), '\n\nMia': (13, 13, 29924, 423), '\n\nOne': (13, 13, 6716),
    '\n\nSam': (13, 13, 22966), '\n\nSara': (13, 13, 29903, 2518), '\n\nSue': (13, 13, 29903, 434),
    '\n\nThe': (13, 13, 1576), '\n\nThey': (13, 13, 15597), '\n\nTim': (13, 13, 13711),
    '\n\nTom': (13, 13, 21599), ' "Can': (376, 6028), ' "Do': (376, 6132), ' "I': (376, 29902),
    ' "Let\'s': (376, 12024, 29915, 29879), ' "Mom': (376, 29924, 290), ' "Thank': (376, 25271),
    ' "Try': (376, 15870), ' "What': (376, 5618), ' "Why': (376, 11008), ' "You': (376, 3492),
    ' A': (319,), ' Amy': (28533,), ' Anna': (11230,), ' At': (2180,), ' Ben': (4111,),
    ' Bob': (7991,), ' Emma': (26422,), ' From': (3645,), ' He': (940,), ' Her': (2439,),
    ' His': (3600,), ' I': (306,), ' It': (739,), ' Jack': (5457,), ' Leo': (22533,),
    " Let's": (2803, 29915, 29879), ' Lily': (365, 2354), ' Lucy': (28846,), ' Max': (5918,),
    ' Mia': (341, 423), ' Mom': (341, 290), ' Once': (9038,), ' One': (3118,), ' Sam': (3685,),
    ' Sara': (317, 2518), ' Sharing': (1383, 4362), ' She': (2296,), ' Sue': (28674,),
    ' The': (450,), ' Then': (1987,), ' There': (1670,), ' They': (2688,), ' This': (910,),
    ' Tim': (7870,), ' Tom': (4335,), ' When': (1932,), ' You': (887,), ' a': (263,),
    ' about': (1048,), ' afraid': (13421,), ' again': (1449,), ' all': (599,), ' and': (322,),
    ' anymore': (15128,), ' are': (526,), ' around': (2820,), ' asked': (4433,), ' at': (472,),
    ' away': (3448,), ' ball': (8287,), ' balloon': (6411, 417, 265), ' be': (367,),
    ' beach': (25695,), ' bear': (11460,), ' because': (1363,), ' behind': (5742,),
    ' best': (1900,), ' big': (4802,), ' bike': (4768, 446), ' bird': (11199,), ' blue': (7254,),
    ' boat': (13006,), ' book': (3143,), ' books': (8277,), ' both': (1716,), ' boy': (8023,),
    ' brave': (26565,), ' build': (2048,), ' bunny': (289, 348, 1460), ' bush': (27089,),
    ' but': (541,), ' by': (491,), ' came': (2996,), ' can': (508,), ' car': (1559,),
    ' cat': (6635,), ' climb': (10784, 29890), ' cold': (11220,), ' could': (1033,),
    ' cry': (10901,), ' curious': (12758,), ' dance': (17948,), ' day': (2462,), ' did': (1258,),
    ' do': (437,), ' dog': (11203,), ' doll': (11232,), ' down': (1623,), ' draw': (4216,),
    ' drum': (24103,), ' duck': (868, 384), ' end': (1095,), ' ever': (3926,), ' every': (1432,),
    ' everywhere': (16978,), ' farm': (17888,), ' fell': (8379,), ' felt': (7091,),
    ' find': (1284,), ' first': (937,), ' flower': (28149,), ' fly': (11340,), ' forest': (13569,),
    ' found': (1476,), ' fox': (1701, 29916), ' friend': (5121,), ' friendly': (19780,),
    ' friends': (7875,), ' frog': (285, 9102), ' fun': (2090,), ' funny': (2090, 1460),
    ' garden': (16423,), ' girl': (7826,), ' give': (2367,), ' go': (748,), ' gone': (7695,),
    ' good': (1781,), ' grass': (17455,), ' green': (7933,), ' had': (750,), ' happy': (9796,),
    ' hard': (2898,), ' hat': (3056,), ' he': (540,), ' heard': (6091,), ' help': (1371,),
    ' her': (902,), ' hill': (17306,), ' him': (1075,), ' his': (670,), ' home': (3271,),
    ' in': (297,), ' is': (338,), ' it': (372,), ' jump': (12500,), ' just': (925,),
    ' kind': (2924,), ' kite': (413, 568), ' last': (1833,), ' laughed': (19090,),
    ' learned': (10972,), ' like': (763,), ' liked': (23289,), ' little': (2217,),
    ' lived': (10600,), ' log': (1480,), ' look': (1106,), ' looked': (5148,), ' lost': (5714,),
    ' loud': (22526,), ' loved': (18012,), ' made': (1754,), ' mom': (16823,), ' morning': (7250,),
    ' mouse': (9495,), ' much': (1568,), ' my': (590,), ' name': (1024,), ' named': (4257,),
    ' near': (2978,), ' never': (2360,), ' new': (716,), ' next': (2446,), ' no': (694,),
    ' noise': (11462,), ' not': (451,), ' on': (373,), ' once': (2748,), ' outside': (5377,),
    ' over': (975,), ' park': (14089,), ' pictures': (14956,), ' pink': (282, 682),
    ' play': (1708,), ' played': (5318,), ' playing': (8743,), ' pond': (282, 898),
    ' proud': (22314,), ' puppy': (2653, 23717), ' ran': (6350,), ' read': (1303,),
    ' red': (2654,), ' ride': (22203,), ' river': (8580,), ' rock': (7679,), ' rocks': (23150,),
    ' run': (1065,), ' sad': (14610,), ' said': (1497,), ' saw': (4446,), ' scared': (885, 1965),
    ' see': (1074,), ' share': (6232,), ' sharing': (19383,), ' she': (1183,),
    ' shiny': (528, 4901), ' shy': (528, 29891), ' silly': (24866,), ' sing': (1809,),
    ' sky': (14744,), ' small': (2319,), ' smiled': (25156,), ' so': (577,), ' songs': (12516,),
    ' started': (4687,), ' sun': (6575,), ' sunny': (6575, 1460), ' swim': (2381, 326),
    ' tall': (15655,), ' that': (393,), ' the': (278,), ' them': (963,), ' there': (727,),
    ' time': (931,), ' to': (304,), ' together': (4208,), ' told': (5429,), ' too': (2086,),
    ' tower': (19372,), ' town': (4726,), ' tree': (5447,), ' trees': (10697,), ' tried': (1898,),
    ' truck': (534, 2707), ' under': (1090,), ' until': (2745,), ' up': (701,), ' upon': (2501,),
    ' very': (1407,), ' walked': (17096,), ' want': (864,), ' wanted': (5131,), ' warm': (14294,),
    ' was': (471,), ' water': (4094,), ' went': (3512,), ' were': (892,), ' when': (746,),
    ' who': (1058,), ' will': (674,), ' wind': (8805,), ' with': (411,), ' worry': (15982,),
    ' wrong': (2743,), ' yellow': (13328,), ' you': (366,), ' your': (596,), '!': (29991,),
    '!"': (3850,), ',': (29892,), ',"': (1699,), '.': (29889,), '."': (1213,), '?"': (3026,),
}
