"""Facts asked in other words, for the `paraphrase` and `association` needle kinds.

`PARAPHRASES`: a fact stated with one set of content words and asked with another (synonyms,
kinship, hypernyms), so that no content word, and on the model's tokenizer no content token, is
shared (`shared_content_tokens`): lexical ranking has nothing to match, as when people ask about
something said an hour ago. `LANDMARKS`: NoLiMa's one-hop association (Modarressi et al., "NoLiMa:
Long-Context Evaluation Beyond Literal Matching", ICML 2025): the fact names a landmark, the
question its city, so answering takes the model's world knowledge as well as the fact.
Each template is used once per stream, so that every question names one fact.
"""
from __future__ import annotations

from typing import Callable

PET_NAMES = ("Pickles", "Biscuit", "Marmalade", "Noodle", "Pepper", "Waffles", "Mochi", "Ziggy", "Clover", "Pudding")
COLOURS = ("red", "blue", "green", "yellow", "purple", "orange", "white", "black", "pink", "grey")
SPICES = ("saffron", "cinnamon", "nutmeg", "paprika", "cumin", "ginger", "turmeric", "cardamom")
CAR_MAKES = ("Volvo", "Toyota", "Ferrari", "Honda", "Porsche", "Fiat", "Tesla", "Renault")
INSTRUMENTS = ("violin", "trumpet", "cello", "flute", "harp", "drums", "clarinet", "banjo")
SUBJECTS = ("chemistry", "history", "geology", "astronomy", "economics", "medicine", "philosophy", "botany")
TOWNS = ("Lisbon", "Oslo", "Nairobi", "Montreal", "Kyoto", "Dublin", "Santiago", "Vienna", "Cairo", "Helsinki")
NUMBERS = "number"  # a five-digit number drawn for the fact

# (statement with {v}, question, the answer's start, the values {v} is drawn from)
PARAPHRASES = (
    ("My sister has a cat named {v}.", "What is my sibling's pet called?", "My sibling's pet is called", PET_NAMES),
    ("The combination of the safe is {v}.", "Which digits unlock the strongbox?",
     "The digits that unlock the strongbox are", NUMBERS),
    ("Our dentist moved her practice to {v}.", "In which city does the tooth doctor work now?",
     "The tooth doctor works in", TOWNS),
    ("The chef's favourite spice is {v}.", "Which seasoning does the cook like best?",
     "The seasoning the cook likes best is", SPICES),
    ("The captain painted his boat {v}.", "What colour is the skipper's vessel?", "The skipper's vessel is", COLOURS),
    ("The lawyer drives a {v}.", "Which automobile does the attorney own?", "The attorney owns a", CAR_MAKES),
    ("The wizard's apprentice is named {v}.", "Who is the sorcerer's pupil?", "The sorcerer's pupil is", PET_NAMES),
    ("The doctor's password is {v}.", "Which secret code lets the physician log in?",
     "The physician logs in with", NUMBERS),
    ("The farmer sold his horse for {v} dollars.", "How much money did the grower get for the stallion?",
     "The grower got", NUMBERS),
    ("My uncle's dog is named {v}.", "What is my father's brother's hound called?",
     "My father's brother's hound is called", PET_NAMES),
    ("The mayor's son plays the {v}.", "Which instrument does the town leader's boy perform on?",
     "The town leader's boy performs on the", INSTRUMENTS),
    ("The pilot's daughter studies {v}.", "Which subject does the aviator's girl learn at university?",
     "The aviator's girl learns", SUBJECTS),
    ("The baker's van is {v}.", "What colour is the pastry cook's truck?", "The pastry cook's truck is", COLOURS),
    ("Grandmother grew up in {v}.", "In which city did my nan spend her childhood?",
     "My nan spent her childhood in", TOWNS),
    ("The sailor buried his treasure near {v}.", "Close to which city did the seaman hide his riches?",
     "The seaman hid his riches close to", TOWNS),
    ("The fisherman's parrot is named {v}.", "What is the angler's bird called?", "The angler's bird is called",
     PET_NAMES),
)

# (a landmark, its city): the fact says who lives by the landmark, the question asks who has been to the city
LANDMARKS = (
    ("Eiffel Tower", "Paris"), ("Colosseum", "Rome"), ("Big Ben", "London"), ("Brandenburg Gate", "Berlin"),
    ("Sagrada Familia", "Barcelona"), ("Kremlin", "Moscow"), ("Statue of Liberty", "New York"),
    ("Golden Gate Bridge", "San Francisco"), ("Sydney Opera House", "Sydney"), ("Acropolis", "Athens"),
    ("Forbidden City", "Beijing"), ("Burj Khalifa", "Dubai"), ("CN Tower", "Toronto"),
    ("Christ the Redeemer statue", "Rio de Janeiro"), ("Little Mermaid statue", "Copenhagen"),
    ("Atomium", "Brussels"), ("Space Needle", "Seattle"), ("Blue Mosque", "Istanbul"), ("Rijksmuseum", "Amsterdam"),
    ("Charles Bridge", "Prague"),
)

# words that carry no content: a fact and its question may share these (and punctuation)
STOPWORDS = frozenset("""a an the of to in on at by for with from is are was were be been has have had do does did
my our your his her their its it this that which what who whom whose where when how much many s 's now""".split())


def shared_content_tokens(tokenize: Callable[[str], list[int]], statement: str, question: str) -> set[int]:
    """Token ids that `statement` and `question` share beyond stopwords and punctuation (as the
    model's tokenizer splits them, with and without a leading space and capital)."""
    def functional(word: str) -> set[int]:
        return {t for form in (word, word.capitalize()) for text in (form, " " + form) for t in tokenize(text)}
    ignore = set().union(*(functional(w) for w in STOPWORDS))
    ignore |= {t for p in ".,?!'\"-:;" for t in tokenize(p) + tokenize(" " + p)}
    return (set(tokenize(statement)) & set(tokenize(question))) - ignore
