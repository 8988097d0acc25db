// One block of DGMR greedy picks (see pruning/select.py, _pick_block): the per-pick vector work
// of the blocked method in compiled code, where NumPy's per-call overhead dominated.
// Same algorithm and tie rule as the NumPy path: a pool of the rows with the largest block-start
// norms is followed exactly; it doubles while a row outside it could still win, and the block
// ends early when it would pass `limit` rows.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <numeric>
#include <vector>

namespace {

// Sixteen independent partial sums: the compiler vectorises them without reassociating anything.
template <typename T>
inline T dot(const T* a, const T* b, int64_t n) {
  constexpr int64_t kLanes = 16;
  T acc[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes)
    for (int64_t l = 0; l < kLanes; ++l) acc[l] += a[i + l] * b[i + l];
  T s = 0;
  for (int64_t l = 0; l < kLanes; ++l) s += acc[l];
  for (; i < n; ++i) s += a[i] * b[i];
  return s;
}

template <typename T>
struct Pool {
  int64_t n, block;
  std::vector<int64_t> index;   // row number of each pool member
  std::vector<T> rows;          // [size, n] block-start residuals
  std::vector<T> coef;          // [size, block] coefficients on the block's directions
  std::vector<double> current;  // exact current squared norms
};

template <typename T>
int64_t pick_block(const T* residual, int64_t ld, int64_t m, int64_t n, const double* sq_norm,
                   uint8_t* available, int64_t block, double tol2, int64_t limit, int64_t* picks,
                   T* basis, int64_t* exhausted) {
  const double neg_inf = -std::numeric_limits<double>::infinity();
  // Candidates by block-start bound, largest first, lower row first among equals.
  std::vector<int64_t> order;
  order.reserve(m);
  for (int64_t i = 0; i < m; ++i)
    if (available[i]) order.push_back(i);
  const int64_t left_total = static_cast<int64_t>(order.size());
  const int64_t want = std::min<int64_t>(left_total, limit * block * 2 + 1);
  auto by_bound = [&](int64_t a, int64_t b) {
    return sq_norm[a] > sq_norm[b] || (sq_norm[a] == sq_norm[b] && a < b);
  };
  std::nth_element(order.begin(), order.begin() + want - (want > 0), order.end(), by_bound);
  std::sort(order.begin(), order.begin() + want, by_bound);
  int64_t sorted_upto = want;

  Pool<T> pool{n, block, {}, {}, {}, {}};
  int64_t taken = 0;  // prefix of `order` in the pool
  int64_t j = 0;      // picks made in this block
  auto outside = [&]() -> double { return taken < left_total ? sq_norm[order[taken]] : neg_inf; };
  auto grow = [&](int64_t count) {
    count = std::min(count, left_total - taken);
    if (taken + count + 1 > sorted_upto && sorted_upto < left_total) {
      std::sort(order.begin() + sorted_upto, order.end(), by_bound);  // rarely needed
      sorted_upto = left_total;
    }
    const int64_t old = static_cast<int64_t>(pool.index.size());
    pool.index.resize(old + count);
    pool.rows.resize((old + count) * n);
    pool.coef.resize((old + count) * block, T(0));
    pool.current.resize(old + count);
    for (int64_t p = old; p < old + count; ++p) {
      const int64_t row = order[taken + (p - old)];
      pool.index[p] = row;
      T* dst = pool.rows.data() + p * n;
      std::copy(residual + row * ld, residual + row * ld + n, dst);
      double cur = sq_norm[row];
      for (int64_t t = 0; t < j; ++t) {
        const T c = dot(dst, basis + t * n, n);
        pool.coef[p * block + t] = c;
        cur -= static_cast<double>(c) * static_cast<double>(c);
      }
      pool.current[p] = cur;
    }
    taken += count;
  };
  auto best = [&]() -> int64_t {
    int64_t k = 0;
    for (int64_t p = 1; p < static_cast<int64_t>(pool.current.size()); ++p) {
      const double a = pool.current[p], b = pool.current[k];
      if (a > b || (a == b && pool.index[p] < pool.index[k])) k = p;
    }
    return k;
  };

  *exhausted = 0;
  grow(2 * block);
  std::vector<T> r(n), c2(block);
  for (j = 0; j < block; ++j) {
    int64_t k = best();
    // Strictly beating every outside bound proves no outside row can win or tie.
    while (pool.current[k] <= outside() && taken < left_total) {
      if (j && static_cast<int64_t>(pool.index.size()) >= limit * block) {
        for (int64_t t = 0; t < j; ++t) available[picks[t]] = 0;
        return j;
      }
      grow(2 * static_cast<int64_t>(pool.index.size()));
      k = best();
    }
    if (pool.current[k] <= tol2) {
      *exhausted = 1;
      for (int64_t t = 0; t < j; ++t) available[picks[t]] = 0;
      return j;
    }
    const T* row = pool.rows.data() + k * n;
    std::copy(row, row + n, r.begin());
    for (int64_t t = 0; t < j; ++t) {
      const T c = pool.coef[k * block + t];
      const T* q = basis + t * n;
      for (int64_t i = 0; i < n; ++i) r[i] -= c * q[i];
    }
    for (int64_t t = 0; t < j; ++t) c2[t] = dot(basis + t * n, r.data(), n);  // second pass
    for (int64_t t = 0; t < j; ++t) {
      const T c = c2[t];
      const T* q = basis + t * n;
      for (int64_t i = 0; i < n; ++i) r[i] -= c * q[i];
    }
    const T inv = T(1) / std::sqrt(dot(r.data(), r.data(), n));
    T* q = basis + j * n;
    for (int64_t i = 0; i < n; ++i) q[i] = r[i] * inv;
    const int64_t size = static_cast<int64_t>(pool.index.size());
    for (int64_t p = 0; p < size; ++p) {
      const T c = dot(pool.rows.data() + p * n, q, n);
      pool.coef[p * block + j] = c;
      pool.current[p] -= static_cast<double>(c) * static_cast<double>(c);
    }
    pool.current[k] = neg_inf;
    picks[j] = pool.index[k];
  }
  for (int64_t t = 0; t < block; ++t) available[picks[t]] = 0;
  return block;
}

}  // namespace

extern "C" {
int64_t dgmr_pick_block_f32(const float* residual, int64_t ld, int64_t m, int64_t n, const double* sq_norm,
                            uint8_t* available, int64_t block, double tol2, int64_t limit, int64_t* picks,
                            float* basis, int64_t* exhausted) {
  return pick_block<float>(residual, ld, m, n, sq_norm, available, block, tol2, limit, picks, basis, exhausted);
}
int64_t dgmr_pick_block_f64(const double* residual, int64_t ld, int64_t m, int64_t n, const double* sq_norm,
                            uint8_t* available, int64_t block, double tol2, int64_t limit, int64_t* picks,
                            double* basis, int64_t* exhausted) {
  return pick_block<double>(residual, ld, m, n, sq_norm, available, block, tol2, limit, picks, basis, exhausted);
}
}
