# Teacher (short context) vs student (long context) greedy accuracy of the base model on the
# first 40 training examples of the CPU preset (multikey, 512 tokens, train seed 0).
from opsdl.data import make_examples
from opsdl.eval import accuracy
from opsdl.model import load_model

model, tok = load_model("smollm2-135m", device="cpu")
count = lambda t: len(tok(t, add_special_tokens=False).input_ids)
ex = make_examples("multikey", 40, 512, count, seed=0)
answers = [e.answers() for e in ex]
qs = [e.question for e in ex]
teacher, _ = accuracy(model, tok, [e.short_context for e in ex], qs, answers, 4, 32)
student, _ = accuracy(model, tok, [e.long_context for e in ex], qs, answers, 4, 32)
print(f"train examples 0-39: teacher (short context) {teacher:.3f}, student (512-token long context) {student:.3f}")
