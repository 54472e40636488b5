"""A few kilobytes of plain English, written for this project, on which the test and demo tokenizers are trained.

The text only has to give byte-level BPE enough common words and word pieces to learn a vocabulary of a couple of
thousand tokens; it carries no meaning for the random-weight models that use it.
"""

CORPUS = """\
The river ran slowly past the old mill, and the children sat on the bank to watch the boats go by.
Every morning the baker opened his shop before the sun came up, and the smell of fresh bread filled the street.
A small language model reads a sequence of tokens and predicts the next one, one step at a time.
When the weather turned cold, the farmers brought the sheep down from the hills and counted them twice.
She wrote a letter to her brother, who lived in a city by the sea, and asked him to visit in the spring.
The library was quiet except for the sound of pages turning and the clock ticking above the door.
Engineers measure the speed of a program before they change it, and again after, so that they know what helped.
In the garden there were roses, tulips, and a long row of beans that climbed toward the light.
The train was late, so the travellers waited on the platform, drinking tea and talking about the news.
A good teacher asks questions that make students think, and listens carefully to their answers.
The mountain path was steep and narrow, but the view from the top was worth every difficult step.
Numbers can be written in many ways: one, two, three, four, five, six, seven, eight, nine, and ten.
He fixed the broken chair with glue and a few nails, then painted it blue to match the kitchen table.
Computers store text as bytes, and a tokenizer turns those bytes into pieces that a model can use.
The market on Saturday sold apples, pears, cheese, honey, warm bread, and flowers of every colour.
After the storm, the sky cleared and a bright rainbow appeared over the fields and the quiet village.
Memory is precious on a graphics card, so an inference engine keeps its cache in small fixed blocks.
The captain looked at the map, checked the wind, and decided to sail north before the evening tide.
Reading a book by the fire on a winter night is one of the simplest and best pleasures in life.
The scientist repeated the experiment three times, wrote down every result, and shared the data.
Birds sang in the trees at dawn, and the first light touched the roofs of the sleeping houses.
If you want to learn something well, practise a little every day and do not be afraid of mistakes.
The museum had paintings from many centuries, and each room told a different part of the story.
Our team met on Monday to plan the work for the week, and on Friday we looked at what we had finished.
A request arrives, waits in a queue, is scheduled with other requests, and finally returns its answer.
The cat slept on the warm windowsill while the dog chased leaves across the yard in the wind.
Water boils at one hundred degrees at sea level, but at a lower temperature high in the mountains.
She planted an oak tree when she was young, and now her grandchildren play in its wide shade.
The recipe needs two cups of flour, one egg, a spoon of sugar, a pinch of salt, and some milk.
Good software is simple to read, easy to test, and honest about what it does and does not do.
The stars were bright above the desert, and the travellers could see the long band of the galaxy.
Questions and answers, prompts and replies: a chat is a list of messages from a user and an assistant.
The bridge was built of stone more than two hundred years ago and still carries traffic every day.
He kept a notebook in his pocket to write down ideas, names, and the words of songs he liked.
On the first day of school the children were nervous, but by the end of the week they were friends.
The ocean is deep and cold, and many strange creatures live far below where sunlight can reach.
A careful driver slows down in the rain, keeps a safe distance, and watches for people crossing.
The orchestra tuned their instruments, the hall went silent, and the conductor raised her hands.
Each token of the prompt is processed once, its keys and values are saved, and decoding reuses them.
They walked along the beach at sunset, collecting shells and watching the waves roll onto the sand.
The town council voted to build a new park with paths, benches, a pond, and a place for children.
Fresh vegetables taste best in summer, when tomatoes are red and sweet and corn is picked that morning.
A clock has two hands: the short one shows the hour and the long one shows the minutes.
The old man told stories of his youth, of ships and harbours and friends in distant countries.
Light travels faster than sound, which is why we see the lightning before we hear the thunder.
The students built a small robot that could follow a line on the floor and stop at a wall.
Please write a short poem about the moon, the sea, and a lighthouse standing alone on the rocks.
What is the capital of France? The capital of France is Paris, a city on the river Seine.
How many days are there in a week? There are seven days in a week, from Monday to Sunday.
Tell me a story about a brave little mouse who wanted to see the world beyond the farm.
Explain why the sky is blue in simple words that a child could understand and remember.
The quick brown fox jumps over the lazy dog, and the lazy dog does not seem to mind at all.
Autumn brought golden leaves, crisp mornings, baskets of mushrooms, and smoke curling from chimneys.
The pilot announced a short delay because of heavy fog, and the passengers opened their newspapers.
Volcanoes, glaciers, canyons and coral reefs shape the landscapes that geographers describe and explore.
Grandmother knitted scarves for everyone in the family, each one a different pattern and colour.
The detective examined the footprints near the gate, then quietly questioned the nervous gardener.
Mathematics describes patterns: triangles, circles, prime numbers, probability, and infinite series.
Hospitals rely on nurses, doctors, pharmacists, cleaners and volunteers working together through the night.
The violinist practised scales for hours, improving her rhythm, intonation and expressive phrasing.
Thunderstorms rolled across the prairie while cattle huddled beneath the cottonwood trees.
Our neighbourhood bakery sells croissants, baguettes, muffins, pretzels and delicious cinnamon rolls.
Electricity flows through copper wires, lighting lamps, heating kettles and charging telephones.
The explorer packed a compass, a blanket, dried fruit, matches, rope and a waterproof journal.
Penguins waddle across the ice, dive gracefully into freezing water, and catch fish for their chicks.
Philosophers debated justice, freedom, knowledge and happiness in crowded squares of ancient cities.
The carpenter measured twice, sawed carefully, sanded every edge, and varnished the wooden cabinet.
Satellites orbit the planet, photographing hurricanes, forests, deserts and glittering city lights.
Children giggled as the magician pulled ribbons, coins and a surprised rabbit from his velvet hat.
Vaccines train the immune system to recognise dangerous viruses before an infection begins.
The archaeologist brushed away centuries of dust and uncovered pottery, jewellery and bronze tools.
Whales migrate thousands of kilometres, singing haunting songs that echo through the dark ocean.
Farmers rotate crops such as wheat, barley, potatoes and clover to keep their soil healthy.
Firefighters rushed up the ladder, rescued the frightened kitten, and received cheerful applause.
Chemistry explains why iron rusts, why bread rises, and why fireworks explode in brilliant colours.
The journalist interviewed witnesses, verified facts, and published her report before midnight.
Butterflies emerge from cocoons, dry their delicate wings, and flutter among lavender and thyme.
Architects sketch buildings with balconies, staircases, courtyards, skylights and sturdy foundations.
The goalkeeper leapt sideways, stretched his gloves, and pushed the ball just over the crossbar.
Kangaroos, koalas, wombats and platypuses are unusual animals found mostly in Australia.
Winter evenings invite soup, blankets, board games, candlelight and long conversations with friends.
Programmers write functions, fix bugs, review changes, and measure latency and throughput carefully.
"""
